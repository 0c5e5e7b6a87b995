"""The rollout interface: an engine turns rendered prompts into sampled responses with their log-probs.

A backend is one small class (`generate`, `load_weights`) registered by name and chosen in YAML
(`rollout.backend`). Engines see `RenderedPrompt`s (token ids + video tensors), never the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from collections.abc import Callable

import torch

from models.chat import RenderedPrompt


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

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:  # pragma: no cover - interface
        """Replace the engine's weights by the trainer's (after every update), without restarting it."""
        raise NotImplementedError


_ENGINES: dict[str, Callable[..., RolloutEngine]] = {}


def register_engine(name: str) -> Callable[[Callable[..., RolloutEngine]], Callable[..., RolloutEngine]]:
    def wrap(cls: Callable[..., RolloutEngine]) -> Callable[..., RolloutEngine]:
        _ENGINES[name] = cls
        return cls

    return wrap


def get_engine_class(name: str) -> Callable[..., Any]:
    if name not in _ENGINES:
        if name == "vllm":
            try:
                import rollout.vllm_engine  # noqa: F401  (registers itself)
            except ImportError as err:
                raise ImportError(
                    "rollout.backend=vllm needs vLLM: install it with `pip install -e \".[vllm]\"` "
                    f"(import failed: {err})"
                ) from err
        else:
            import rollout.hf_engine  # noqa: F401
            import rollout.reference_engine  # noqa: F401
    if name not in _ENGINES:
        raise KeyError(f"unknown rollout backend {name!r}; registered: {', '.join(sorted(_ENGINES))}")
    return _ENGINES[name]
