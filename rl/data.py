"""The training prompt stream: a seeded permutation per epoch, with a position that checkpoints save."""

from __future__ import annotations

import random
from typing import Any

from tasks.base import Sample, get_task_source


def load_tasks(task_configs: list[Any], seed: int, weighted: bool = False) -> list[Sample]:
    """Instantiate every configured task source and collect its samples (errors name the source).

    `weighted` (the training pool): a source's `weight` sets its share - its samples enter the pool `weight`
    times (whole copies, plus a seeded subset for the fraction). Held-out sets are never reweighted."""
    try:  # benchmark adapters register themselves when their package is importable
        import evals  # noqa: F401
    except ImportError:
        pass
    samples: list[Sample] = []
    for i, task in enumerate(task_configs):
        args = dict(task.args)
        if task.source in ("embedded", "embedded_video", "demonstrations"):
            args.setdefault("seed", seed)
        try:
            source = get_task_source(task.source)(**args)
        except TypeError as err:
            raise ValueError(f"data task #{i} (source {task.source!r}): bad arguments {args}: {err}") from err
        weight = float(task.weight)
        if weight <= 0:
            raise ValueError(f"data task #{i} (source {task.source!r}): weight must be > 0, got {weight}")
        items = list(source)
        if weighted and weight != 1.0:
            whole, fraction = int(weight), weight - int(weight)
            extra = random.Random(f"{seed}-weight-{i}").sample(items, round(fraction * len(items)))
            items = items * whole + extra
        samples.extend(items)
    if not samples:
        raise ValueError("the configured task sources yielded no samples")
    return samples


class PromptStream:
    """Yields batches of samples; every epoch is a fresh permutation drawn from (seed, epoch)."""

    def __init__(self, samples: list[Sample], seed: int):
        self.samples = samples
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        order = list(range(len(self.samples)))
        random.Random(f"{self.seed}-{self.epoch}").shuffle(order)
        return order

    def next_batch(self, n: int) -> list[Sample]:
        batch = []
        while len(batch) < n:
            if self.position >= len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._permutation()
            batch.append(self.samples[self._order[self.position]])
            self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = state["epoch"]
        self.position = state["position"]
        self._order = self._permutation()
