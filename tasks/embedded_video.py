"""Video-RL tasks of the embedded suite, and a task source of real video files.

Embedded tasks (same clips as the embedded grounding task: 8 frames of 16x16 at 1 fps, noise background, 8x8
coloured squares whose visibility spans whole 2-second temporal groups):

- grounding: "When is the red square visible?" -> `[s, e]` (reward `temporal_iou`), the embedded task itself.
- captioning: dense captioning with timestamps, "Describe every event with its time span." ->
  `[0, 2] red square\\n[4, 8] blue square` (one line per square, by start time; reward `dense_caption`).
- verification: "Is the red square visible at second 4?" -> `yes` / `no` (reward `yes_no`); half the
  questions are true, and a false one asks either about a second outside the square's span or about a colour
  the clip never shows.

Every sample names its reward (`Sample.reward`) because all three share the "video" domain. Samples are stored
with `datasets` under `data_dir/v<embedded SUITE_VERSION>-seed<seed>/embedded_video_v1/<task>/<split>` like the
embedded suite (the grounding generator is the embedded one, so its version keys the store too). As in the embedded
suite, the question comes before the video so that the video tokens can attend to what is asked.

`video_files` reads real clips by reference: JSONL lines `{"video": path, "query": text, "window": [s, e]}`
(optional `id`, `duration`, or `windows: [[s, e], ...]`), video paths relative to the JSONL file. Frames are
decoded later, in the data workers (`tasks.prefetch`).
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path
from typing import Any
from collections.abc import Iterator, Sequence

import numpy as np
from datasets import Dataset, load_from_disk

from tasks.base import Sample, TaskSource, VideoPart, register_task_source
from tasks.embedded import (
    COLOURS,
    GROUP_SECONDS,
    SUITE_VERSION,
    VIDEO_FPS,
    VIDEO_FRAMES,
    _from_row,
    _to_row,
    draw_squares,
    make_video_sample,
)

TASKS = ("grounding", "captioning", "verification")
STORE_VERSION = "embedded_video_v1"
DURATION = int(VIDEO_FRAMES / VIDEO_FPS)
CAPTION_QUESTION = "Describe every event with its time span. Answer one event per line as [start, end] caption."
GROUNDING_QUESTION = 'When does "{query}" happen in the video? Answer as [start, end] in seconds.'


# ----------------------------------------------------------------------------- drawing


def random_span(rng: random.Random) -> tuple[int, int]:
    """A `[start, end)` span in whole seconds on the 2-second temporal groups of the 8-second clip."""
    g = GROUP_SECONDS
    start = rng.randrange(0, DURATION, g)
    return start, rng.randrange(start + g, DURATION + 1, g)


def _question_then_video(question: str, video: VideoPart) -> list[dict]:
    """The user turn: question first (as in the embedded suite), then the clip."""
    return [{"role": "user", "content": [{"type": "text", "text": question + "\n"}, {"type": "video", "video": video}]}]


def _video_message(frames: np.ndarray, timestamps: list[float], captions: list[str], question: str) -> list[dict]:
    video = VideoPart(frames=frames, timestamps=timestamps, captions=captions, fps=VIDEO_FPS)
    return _question_then_video(question, video)


# ----------------------------------------------------------------------------- generators


def make_grounding_sample(rng: random.Random, idx: int, split: str) -> Sample:
    """The embedded grounding task, under this suite's ids and with its reward named."""
    sample = make_video_sample(rng, idx, split)
    return replace(sample, id=f"vground-{split}-{idx}", reward="temporal_iou")


def make_captioning_sample(rng: random.Random, idx: int, split: str) -> Sample:
    """One or two squares of different colours; the answer lists each with its span, by start time."""
    colours = rng.sample(list(COLOURS), rng.choice([1, 2]))
    events = [(c, *random_span(rng)) for c in colours]
    frames, timestamps, captions = draw_squares(np.random.default_rng(rng.randrange(1 << 30)), events)
    ordered = sorted(events, key=lambda e: (e[1], e[2], e[0]))
    target = "\n".join(f"[{s}, {e}] {c} square" for c, s, e in ordered)
    return Sample(
        id=f"vcaption-{split}-{idx}",
        domain="video",
        messages=_video_message(frames, timestamps, captions, CAPTION_QUESTION),
        reference=[{"start": float(s), "end": float(e), "caption": f"{c} square"} for c, s, e in ordered],
        reward="dense_caption",
        target=target,
        metadata={"task": "dense_captioning", "duration": float(DURATION), "events": len(events)},
    )


def make_verification_sample(rng: random.Random, idx: int, split: str) -> Sample:
    """A target square on a span plus a distractor; the question asks whether a colour shows at one second."""
    names = list(COLOURS)
    colour, distractor = rng.sample(names, 2)
    span, d_span = random_span(rng), random_span(rng)
    frames, timestamps, captions = draw_squares(
        np.random.default_rng(rng.randrange(1 << 30)), [(colour, *span), (distractor, *d_span)]
    )
    seconds = range(DURATION)
    inside = [t for t in seconds if span[0] <= t < span[1]]
    outside = [t for t in seconds if t not in inside]
    asked = colour
    if rng.random() < 0.5:
        second, answer = rng.choice(inside), "yes"
    elif outside and rng.random() < 0.75:
        second, answer = rng.choice(outside), "no"
    else:  # a colour that never appears
        asked = rng.choice([c for c in names if c not in (colour, distractor)])
        second, answer = rng.choice(list(seconds)), "no"
    question = f"Is the {asked} square visible at second {second}? Answer yes or no."
    return Sample(
        id=f"vverify-{split}-{idx}",
        domain="video",
        messages=_video_message(frames, timestamps, captions, question),
        reference=answer,
        reward="yes_no",
        target=answer,
        metadata={"task": "frame_verification", "duration": float(DURATION), "colour": asked, "second": second},
    )


GENERATORS = {
    "grounding": make_grounding_sample,
    "captioning": make_captioning_sample,
    "verification": make_verification_sample,
}


def generate(task: str, split: str, n: int, seed: int) -> list[Sample]:
    """`n` samples of one task and split; train and eval draw from disjoint seeds."""
    if task not in GENERATORS:
        raise ValueError(f"unknown embedded video task {task!r}; known: {', '.join(TASKS)}")
    rng = random.Random(f"{seed}-video-{task}-{split}")
    return [GENERATORS[task](rng, i, split) for i in range(n)]


# ----------------------------------------------------------------------------- storage (datasets)


def _row(sample: Sample) -> dict[str, Any]:
    return {**_to_row(sample), "reward": sample.reward or ""}


def _sample(row: dict[str, Any]) -> Sample:
    return replace(_from_row(row), reward=row["reward"] or None)


def build_video_suite(data_dir: str | Path, seed: int, n_train: int, n_eval: int, tasks: Sequence[str] = TASKS) -> Path:
    """Generate and store each task's train and eval split (skipped when already stored with that size)."""
    root = Path(data_dir) / f"v{SUITE_VERSION}-seed{seed}" / STORE_VERSION
    for task in tasks:
        for split, n in (("train", n_train), ("eval", n_eval)):
            out = root / task / split
            if (out / "dataset_info.json").exists() and len(load_from_disk(str(out))) == n:
                continue
            Dataset.from_list([_row(s) for s in generate(task, split, n, seed)]).save_to_disk(str(out))
    return root


@register_task_source("embedded_video")
class EmbeddedVideoTasks(TaskSource):
    """Video-RL tasks of one split (grounding, captioning, verification), read from the stored datasets."""

    name = "embedded_video"

    def __init__(
        self,
        data_dir: str = ".cache/embedded",
        split: str = "train",
        tasks: Sequence[str] = TASKS,
        seed: int = 0,
        n_train: int = 2000,
        n_eval: int = 64,
        limit: int | None = None,
    ):
        for task in tasks:
            if task not in TASKS:
                raise ValueError(f"embedded_video: unknown task {task!r}; known: {', '.join(TASKS)}")
        if split not in ("train", "eval"):
            raise ValueError(f"embedded_video: split must be 'train' or 'eval', got {split!r}")
        root = build_video_suite(data_dir, seed, n_train, n_eval, tuple(tasks))
        self.samples: list[Sample] = []
        for task in tasks:
            ds = load_from_disk(str(root / task / split))
            rows = ds if limit is None else ds.select(range(min(limit, len(ds))))
            self.samples.extend(_sample(r) for r in rows)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def __len__(self) -> int:
        return len(self.samples)


# ----------------------------------------------------------------------------- real video files


def _windows(record: dict[str, Any], where: str) -> list[list[float]]:
    raw = record.get("windows", [record["window"]] if "window" in record else None)
    if not raw:
        raise ValueError(f"{where}: needs 'window': [start, end] or 'windows'")
    windows = []
    for w in raw:
        if not isinstance(w, (list, tuple)) or len(w) != 2:
            raise ValueError(f"{where}: window {w!r} is not [start, end]")
        start, end = float(w[0]), float(w[1])
        if not 0 <= start <= end:
            raise ValueError(f"{where}: window {w!r} needs 0 <= start <= end")
        windows.append([start, end])
    return windows


def read_video_annotations(path: str | Path) -> list[Sample]:
    """Grounding samples from one JSONL file (errors name the file and line)."""
    path = Path(path)
    samples = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not JSON ({err})") from err
        for key in ("video", "query"):
            if not isinstance(record.get(key), str) or not record[key].strip():
                raise ValueError(f"{where}: needs a non-empty string {key!r}")
        windows = _windows(record, where)
        video = Path(record["video"])
        video = video if video.is_absolute() else path.parent / video
        question = GROUNDING_QUESTION.format(query=record["query"].strip())
        metadata: dict[str, Any] = {"task": "temporal_grounding", "source_file": str(video), "query": record["query"]}
        if record.get("duration") is not None:
            metadata["duration"] = float(record["duration"])
        samples.append(Sample(
            id=str(record.get("id", f"{path.stem}-{line_no}")),
            domain="video",
            messages=_question_then_video(question, VideoPart(path=str(video))),
            reference=windows[0] if len(windows) == 1 else windows,
            reward="temporal_iou",
            target="[{:g}, {:g}]".format(*windows[0]),
            metadata=metadata,
        ))
    return samples


@register_task_source("video_files")
class VideoFileTasks(TaskSource):
    """Temporal grounding on real clips listed in a JSONL file, or in every `*.jsonl` of a folder (sorted)."""

    name = "video_files"

    def __init__(self, path: str, limit: int | None = None):
        self.samples = [s for f in self.annotation_files(path) for s in read_video_annotations(f)]
        if limit is not None:
            self.samples = self.samples[:limit]

    @staticmethod
    def annotation_files(path: str) -> list[Path]:
        root = Path(path)
        if root.is_dir():
            files = sorted(root.glob("*.jsonl"))
            if not files:
                raise FileNotFoundError(f"video_files: no *.jsonl annotation file in {root}")
            return files
        if root.is_file():
            return [root]
        raise FileNotFoundError(f"video_files: {root} does not exist")

    @classmethod
    def check_args(cls, path: str, limit: int | None = None) -> None:
        """What `check` runs: every annotation line parses (errors name file:line); videos are not opened. A path
        that is not here yet passes (data often lives only where the job runs)."""
        if not Path(path).exists():
            return
        for f in cls.annotation_files(path):
            read_video_annotations(f)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def __len__(self) -> int:
        return len(self.samples)
