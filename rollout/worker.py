"""What a rollout actor hosts: one engine, plus the per-shard seed so sampling is reproducible."""

from __future__ import annotations

import dataclasses
from typing import Any

from models.chat import RenderedPrompt
from rollout.base import Generations, SamplingSettings, get_engine_class


class RolloutWorker:
    def __init__(self, backend: str, engine_kwargs: dict[str, Any]):
        self.engine = get_engine_class(backend)(**engine_kwargs)

    def generate(
        self,
        prompts: list[RenderedPrompt],
        targets: list[list[int]] | None,
        shard_index: int = 0,
        settings: SamplingSettings | None = None,
    ) -> Generations:
        settings = settings or SamplingSettings()
        shard_settings = dataclasses.replace(settings, seed=settings.seed + 7919 * shard_index)
        if targets is not None and all(t is None for t in targets):
            targets = None
        return self.engine.generate(prompts, shard_settings, targets)

    def load_weights(self, state_dict, last: bool = True) -> None:
        """One bucket of a weight sync; `last` marks the sync's final bucket."""
        self.engine.load_weights(state_dict, last=last)


def combine_generations(parts: list[Generations]) -> Generations:
    out = Generations([], [], [])
    for part in parts:
        out.extend(part)
    return out
