"""Shared pieces of the video benchmark adapters: locating a user's video files and counting the missing ones."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov")


class SkipLog:
    """Samples an adapter left out, by reason; reported rather than crashing, so a partial video copy still runs."""

    def __init__(self) -> None:
        self.by_reason: dict[str, list[str]] = defaultdict(list)

    def add(self, reason: str, sample_id: str) -> None:
        self.by_reason[reason].append(sample_id)

    def __len__(self) -> int:
        return sum(len(ids) for ids in self.by_reason.values())

    def as_dict(self) -> dict[str, int]:
        return {reason: len(ids) for reason, ids in sorted(self.by_reason.items())}

    def report(self, name: str) -> str:
        """One line per reason, e.g. `charades_sta: skipped 12 samples (video missing: 12, e.g. 3MSZA#0)`."""
        if not self.by_reason:
            return f"{name}: no samples skipped"
        parts = [f"{reason}: {len(ids)}, e.g. {ids[0]}" for reason, ids in sorted(self.by_reason.items())]
        return f"{name}: skipped {len(self)} samples (" + "; ".join(parts) + ")"


def find_video(video_dir: Path, video_id: str, extensions: tuple[str, ...] = VIDEO_EXTENSIONS) -> Path | None:
    """The first `<video_dir>/<video_id><ext>` that exists, or None."""
    for ext in extensions:
        candidate = video_dir / f"{video_id}{ext}"
        if candidate.is_file():
            return candidate
    return None


def parse_intervals_lazily(text: str) -> list[tuple[float, float]]:
    """The temporal reward's interval parser (imported on use: `rewards.temporal` is a sibling package)."""
    try:
        from rewards.temporal import parse_intervals
    except ImportError as exc:  # pragma: no cover - depends on the rewards package being installed
        raise RuntimeError(
            "scoring free-text answers needs rewards.temporal.parse_intervals, which could not be imported"
        ) from exc
    return [(float(s), float(e)) for s, e in parse_intervals(text)]
