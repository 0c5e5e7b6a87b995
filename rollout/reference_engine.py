"""The tasks' demonstration answers as "rollouts": supervised warm-up (teachers, the base student) through the
same training loop, with the `sft` estimator and `nll` loss."""

from __future__ import annotations

from models.chat import RenderedPrompt
from rollout.base import Generations, RolloutEngine, SamplingSettings, register_engine
from rollout.options import ReferenceEngineOptions


@register_engine("reference", options=ReferenceEngineOptions)
class ReferenceEngine(RolloutEngine):
    def __init__(self, model_path: str | None = None, batch_size: int = 64):
        """The trainer's `model_path` and `batch_size` are accepted and unused: demonstrations need no model."""

    def generate(self, prompts: list[RenderedPrompt], settings: SamplingSettings, targets=None) -> Generations:
        if targets is None or len(targets) != len(prompts):
            raise ValueError("the reference engine needs one demonstration (sample.target) per prompt")
        return Generations([list(t) for t in targets], [[0.0] * len(t) for t in targets], [False] * len(targets))

    def load_weights(self, state_dict, last: bool = True) -> None:
        """Nothing to sync: demonstrations do not depend on the student."""
