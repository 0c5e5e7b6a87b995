"""Stage timings of the kernel paths for benchmarks and tuning (torch only; no Triton needed to import)."""

from __future__ import annotations

import torch


class StageClock:
    """CUDA-event marks between the stages of a path, summed per stage name over repeated stages (chunks);
    `finish` writes them, in ms, to stats['stage_ms']. A no-op unless stats['profile'] is on and on CUDA."""

    def __init__(self, stats: dict, device: torch.device) -> None:
        self.stats = stats
        self.on = bool(stats["profile"]) and device.type == "cuda"
        self.last = None
        self.events: list = []

    def mark(self, name: str | None = None) -> None:
        """End the stage `name` here (None: only start timing from here)."""
        if self.on:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            if self.last is not None and name is not None:
                self.events.append((name, self.last, e))
            self.last = e

    def finish(self) -> None:
        if self.on:
            torch.cuda.synchronize()
            total: dict[str, float] = {}
            for name, a, b in self.events:
                total[name] = total.get(name, 0.0) + a.elapsed_time(b)
            self.stats["stage_ms"] = total
