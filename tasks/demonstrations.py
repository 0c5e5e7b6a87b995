"""Demonstrations written by another model: a task source that wraps any other source and replaces each kept
sample's `target` by a recorded answer (a JSONL file of `{"id": ..., "target": ...}` lines).

What off-policy fine-tuning trains on: the domain teachers' own answers, filtered by the domain reward, fed to
the `reference` rollout backend like any supervised warm-up. Wrapping the source (instead of storing samples)
keeps videos, tools and metadata exactly as the source yields them; only samples named in the file are kept.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tasks.base import Sample, TaskSource, get_task_source, register_task_source


def read_demonstrations(path: str | Path) -> dict[str, str]:
    """`{sample id: answer}` from a JSONL file (later lines win)."""
    out: dict[str, str] = {}
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        record = json.loads(line)
        if "id" not in record or "target" not in record:
            raise ValueError(f"{path}:{i + 1}: a demonstration needs 'id' and 'target', got {sorted(record)}")
        out[str(record["id"])] = str(record["target"])
    return out


@register_task_source("demonstrations")
class DemonstrationTasks(TaskSource):
    """The samples of `source(**args)` that `file` answers, with `target` = that answer."""

    name = "demonstrations"

    def __init__(self, file: str, source: str, args: dict[str, Any] | None = None, seed: int | None = None):
        """`seed` is passed on to the wrapped source when its args lack one (the loader's data seed)."""
        answers = read_demonstrations(file)
        inner_args = dict(args or {})
        if seed is not None and source in ("embedded", "embedded_video"):
            inner_args.setdefault("seed", seed)
        self.samples = [dataclasses.replace(s, target=answers[s.id])
                        for s in get_task_source(source)(**inner_args) if s.id in answers]

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def __len__(self) -> int:
        return len(self.samples)
