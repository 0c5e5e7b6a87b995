"""The tasks' demonstration answers as "rollouts": supervised warm-up (teachers, the base student) through the
same training loop, with the `sft` estimator and `nll` loss."""

from __future__ import annotations

from models.chat import RenderedPrompt
from rollout.base import Generations, RolloutEngine, SamplingSettings, register_engine


@register_engine("reference")
class ReferenceEngine(RolloutEngine):
    def __init__(self, **_: object):
        pass

    def generate(self, prompts: list[RenderedPrompt], settings: SamplingSettings, targets=None) -> Generations:
        if targets is None or len(targets) != len(prompts):
            raise ValueError("the reference engine needs one demonstration (sample.target) per prompt")
        return Generations([list(t) for t in targets], [[0.0] * len(t) for t in targets], [False] * len(targets))

    def load_weights(self, state_dict) -> None:
        """Nothing to sync: demonstrations do not depend on the student."""
