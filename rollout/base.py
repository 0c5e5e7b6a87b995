"""The rollout interface: an engine turns rendered prompts into sampled responses with their log-probs.

A backend is one small class (`generate`, `load_weights`) registered by name and chosen in YAML
(`rollout.backend`). Engines see `RenderedPrompt`s (token ids + video tensors), never the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from collections.abc import Callable

import torch

from core.registry import Registry
from models.chat import RenderedPrompt
from rollout.options import HFEngineOptions, ReferenceEngineOptions, VLLMEngineOptions


@dataclass
class SamplingSettings:
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False
    seed: int = 0
    # Tokens the sampler must never emit (vision placeholders: a sampled <|video_pad|> would make every later
    # forward pass look for pixels that do not exist).
    suppress_token_ids: tuple[int, ...] = ()


@dataclass
class Generations:
    """Per prompt: `response_ids` (ending with end-of-turn unless truncated), the sampler's log-probs of those
    tokens (log softmax of the raw logits, temperature 1, as the trainer computes its own), truncation flags."""

    response_ids: list[list[int]]
    logprobs: list[list[float]]
    truncated: list[bool]

    def extend(self, other: Generations) -> None:
        self.response_ids += other.response_ids
        self.logprobs += other.logprobs
        self.truncated += other.truncated


class RolloutEngine:
    """Base class. `targets` are demonstration responses, read only by the reference engine."""

    def generate(
        self, prompts: list[RenderedPrompt], settings: SamplingSettings, targets: list[list[int]] | None = None
    ) -> Generations:  # pragma: no cover - interface
        raise NotImplementedError

    def load_weights(self, state_dict: dict[str, torch.Tensor], last: bool = True) -> None:  # pragma: no cover
        """Replace (some of) the engine's weights by the trainer's (after every update), without restarting it.
        The trainer streams a sync in buckets; `last` marks its final one (where post-sync work belongs)."""
        raise NotImplementedError


ENGINES: Registry[Callable[..., RolloutEngine]] = Registry("rollout backend")
ENGINES.register("hf", "rollout.hf_engine:HFEngine", options=HFEngineOptions)
ENGINES.register("vllm", "rollout.vllm_engine:VLLMEngine", options=VLLMEngineOptions)
ENGINES.register("reference", "rollout.reference_engine:ReferenceEngine", options=ReferenceEngineOptions)


def register_engine(name: str, options: type | None = None) -> Callable[[Callable[..., RolloutEngine]], Callable[..., RolloutEngine]]:
    """Decorator: make an engine class selectable as `rollout.backend: name`. `options`: the dataclass of its
    `rollout.engine_args` keys (typed and checked by the config loader); None accepts any mapping."""
    info = {"options": options} if options is not None else {}
    return ENGINES.register(name, **info)


def engine_options(name: str) -> type | None:
    """The typed `rollout.engine_args` section of backend `name` (None when it declares none)."""
    return ENGINES.info(name).get("options")


def get_engine_class(name: str) -> Callable[..., Any]:
    try:
        return ENGINES.get(name)
    except ImportError as err:
        if name != "vllm":
            raise
        raise ImportError(
            "rollout.backend=vllm needs vLLM: install it with `pip install -e \".[vllm]\"` "
            f"(import failed: {err})"
        ) from err
