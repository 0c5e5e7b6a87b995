"""The embedded default suite: four tiny but real domains, generated deterministically by seed.

1. video   - temporal grounding: a clip where an object of a named colour is visible during [s, e] seconds.
2. retrieval - a needle `key: value` record in a haystack of filler lines and a question about its key (length
             and depth recorded; optional distractor records).
3. tool    - a question that needs a tool (calculator or lookup table); the answer is a JSON tool call that the
             environment executes.
4. reasoning - short arithmetic / comparison with a checkable answer.

Samples are stored with `datasets` (one dataset per domain and split) so that a run reads exactly the data it
trained on; frames are kept as raw uint8 bytes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from datasets import Dataset, load_from_disk

from tasks.base import Sample, TaskSource, VideoPart, register_task_source

DOMAINS = ("video", "retrieval", "tool", "reasoning")
# Bump when a generator changes: stored datasets are keyed by it, so no run reads data of an older generator.
SUITE_VERSION = 14

COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 230),
    "yellow": (230, 220, 40),
}
KEY_WORDS = (
    "apple river stone cloud maple tiger piano lemon cedar delta eagle flint grape harbor ivory jade kite lotus "
    "mango nickel olive pearl quartz raven silver tulip umber violet willow xenon yarrow zebra amber birch coral "
    "dune ember fern glacier hazel iris juniper kelp lilac meadow north ocean pine quill reef sage thistle"
).split()
# Values are whole words too, so that retrieving one is a single copy (a tiny model learns it in minutes).
VALUE_WORDS = (
    "gold blue bird fish wolf bear frog lamp desk rope ship coin ring bell drum horn king moon star sun rain "
    "snow wind fire salt milk corn rice bean nut egg"
).split()

VIDEO_FPS = 1.0
VIDEO_FRAMES = 8
# Frames pair up into temporal groups (the vision tower's temporal patch), so events start and end on whole groups.
GROUP_SECONDS = 2
FRAME_SIZE = 16

# Compact schemas: every tool-use prompt carries them, and prompt length is the tiny models' main cost.
CALCULATOR_SCHEMA = {
    "name": "calculator",
    "description": "Arithmetic.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
}
LOOKUP_SCHEMA = {
    "name": "lookup",
    "description": "Table lookup.",
    "parameters": {"type": "object", "properties": {"table": {"type": "string"}, "key": {"type": "string"}},
                   "required": ["table", "key"]},
}


# ----------------------------------------------------------------------------- generators


SQUARE = 8


def draw_squares(
    np_rng: np.random.Generator, events: Sequence[tuple[str, int, int]]
) -> tuple[np.ndarray, list[float], list[str]]:
    """Frames with one 8x8 square per event `(colour, start, end)`, visible while `start <= t < end`.

    Event k sits in row band k (top half, then bottom half) at a random column per frame, so squares never
    occlude each other; the background is dark noise (0-39) as in the embedded grounding task.
    Returns frames uint8 `[8, 16, 16, 3]`, timestamps `[8]` seconds, per-frame captions `[8]`."""
    if len(events) > FRAME_SIZE // SQUARE:
        raise ValueError(f"at most {FRAME_SIZE // SQUARE} squares fit a {FRAME_SIZE}-pixel frame, got {len(events)}")
    frames = np_rng.integers(0, 12, size=(VIDEO_FRAMES, FRAME_SIZE, FRAME_SIZE, 3), dtype=np.uint8)
    timestamps = [i / VIDEO_FPS for i in range(VIDEO_FRAMES)]
    captions = []
    for i, t in enumerate(timestamps):
        visible = []
        for band, (colour, start, end) in enumerate(events):
            if start <= t < end:
                x = int(np_rng.integers(0, FRAME_SIZE - SQUARE + 1))
                row = band * SQUARE
                frames[i, row : row + SQUARE, x : x + SQUARE] = COLOURS[colour]
                visible.append(f"{colour} square")
        captions.append(", ".join(visible) if visible else "nothing")
    return frames, timestamps, captions


def make_video_sample(rng: random.Random, idx: int, split: str) -> Sample:
    """A clip of 8 frames at 1 fps (8 s); the named colour is visible during one 2-second group [s, s + 2)."""
    target_colour = rng.choice(list(COLOURS))
    duration = int(VIDEO_FRAMES / VIDEO_FPS)
    # The event fills one temporal group (2 s) of an otherwise dark clip: the tiny models learn to ground it in
    # a couple of hundred steps (a distractor square made that a lottery of much longer plateaus).
    g = GROUP_SECONDS
    start = rng.randrange(0, duration, g)
    end = start + g
    np_rng = np.random.default_rng(rng.randrange(1 << 30))
    frames, timestamps, captions = draw_squares(np_rng, [(target_colour, start, end)])
    question = f"When is the {target_colour} square visible? Answer as [start, end] in seconds."
    video = VideoPart(frames=frames, timestamps=timestamps, captions=captions, fps=VIDEO_FPS)
    return Sample(
        id=f"video-{split}-{idx}",
        domain="video",
        # The question comes first, so the video tokens can already attend to the colour asked about.
        messages=[{"role": "user", "content": [{"type": "text", "text": question + "\n"}, {"type": "video", "video": video}]}],
        reference=[float(start), float(end)],
        target=f"[{start}, {end}]",
        metadata={"task": "temporal_grounding", "duration": float(duration), "colour": target_colour, "start": start},
    )


# Haystack filler: record-shaped lines without a value, in words disjoint from keys and values.
FILLER_LINES = (
    "- the grass is green", "- nothing to report", "- the road is long", "- a door was open", "- the tea is warm",
    "- all is quiet", "- the hill is steep", "- a page is empty", "- the clock is slow", "- the lane is dry",
)


def make_retrieval_sample(
    rng: random.Random, idx: int, split: str, lengths: tuple[int, ...], distractors: int = 0
) -> Sample:
    """Needle in a haystack (RULER's NIAH shape): `n` lines after the question, one of them the `key: value`
    needle at a recorded depth, the others filler, plus `distractors` other `key: value` records (multi-key NIAH).

    Without distractors the needle is the haystack's only record, as in RULER's single-needle task: the tiny
    models learn it in a few hundred steps, while telling same-shaped records apart by key did not start to
    form within 2,000 steps in any tried format (`docs/embedded.md`)."""
    n = rng.choice(lengths)
    keys = rng.sample(KEY_WORDS, 1 + distractors)
    values = [rng.choice(VALUE_WORDS) for _ in keys]
    lines = [rng.choice(FILLER_LINES) for _ in range(max(n - 1 - distractors, 0))]
    for k, v in zip(keys[1:], values[1:]):
        lines.insert(rng.randrange(len(lines) + 1), f"- {k}: {v}")
    pos = rng.randrange(len(lines) + 1)
    lines.insert(pos, f"- {keys[0]}: {values[0]}")
    question = f"Which value is for {keys[0]}?\n" + "\n".join(lines)
    return Sample(
        id=f"retrieval-{split}-{idx}",
        domain="retrieval",
        messages=[{"role": "user", "content": question}],
        reference={"key": keys[0], "value": values[0]},
        target=f" {values[0]}",
        metadata={"task": "niah" if not distractors else "multikey_niah", "length": len(lines),
                  "depth": round(pos / max(len(lines) - 1, 1), 2)},
    )


def make_tool_sample(rng: random.Random, idx: int, split: str) -> Sample:
    """Either a calculator question or a lookup in a table that only the tool environment holds."""
    if rng.random() < 0.5:
        a, b = rng.randrange(10, 100), rng.randrange(10, 100)
        op = rng.choice(["+", "-", "*"])
        expression = f"{a} {op} {b}"
        answer = {"+": a + b, "-": a - b, "*": a * b}[op]
        question = f"Use the calculator to compute {expression}."
        call = {"name": "calculator", "arguments": {"expression": expression}}
        env: dict[str, Any] = {}
        task = "calculator"
    else:
        keys = rng.sample(KEY_WORDS, 6)
        table = {k: rng.choice(VALUE_WORDS) for k in keys}
        key = rng.choice(keys)
        answer = table[key]
        question = f'Use the lookup tool to find the price of "{key}".'
        call = {"name": "lookup", "arguments": {"table": "price", "key": key}}
        env = {"tables": {"price": table}}
        task = "lookup"
    return Sample(
        id=f"tool-{split}-{idx}",
        domain="tool",
        messages=[{"role": "user", "content": question}],
        reference={"answer": answer},
        target=f"<tool_call>{json.dumps(call)}</tool_call>",
        tools=[CALCULATOR_SCHEMA, LOOKUP_SCHEMA],
        metadata={"task": task, "tool_env": env},
    )


def make_reasoning_sample(rng: random.Random, idx: int, split: str) -> Sample:
    """Single-digit arithmetic and comparison with a single-digit answer: a sum (at most 9), a difference (at
    least 0), or the larger of two digits. Each is one fact of a small table (55 + 55 + 90) that the tiny models
    memorise in a few hundred mixed steps; two-digit sums and 2-digit comparisons took them 800 steps alone and
    stayed below 0.5 in the mix (docs/embedded.md)."""
    kind = rng.choice(["add", "sub", "max"])
    if kind == "add":
        a = rng.randrange(10)
        b = rng.randrange(10 - a)
        question, answer = f"What is {a} + {b}?", a + b
    elif kind == "sub":
        a = rng.randrange(10)
        b = rng.randrange(a + 1)
        question, answer = f"What is {a} - {b}?", a - b
    else:
        a, b = rng.sample(range(10), 2)
        question, answer = f"Which is larger, {a} or {b}?", max(a, b)
    return Sample(
        id=f"reasoning-{split}-{idx}",
        domain="reasoning",
        messages=[{"role": "user", "content": question}],
        reference=str(answer),
        target=str(answer),
        metadata={"task": kind},
    )


def generate(
    domain: str, split: str, n: int, seed: int, retrieval_lengths: tuple[int, ...] = (2, 4, 6), distractors: int = 0
) -> list[Sample]:
    """`n` samples of one domain and split; train and eval use disjoint seeds."""
    rng = random.Random(f"{seed}-{domain}-{split}")
    if domain == "video":
        return [make_video_sample(rng, i, split) for i in range(n)]
    if domain == "retrieval":
        return [make_retrieval_sample(rng, i, split, retrieval_lengths, distractors) for i in range(n)]
    if domain == "tool":
        return [make_tool_sample(rng, i, split) for i in range(n)]
    if domain == "reasoning":
        return [make_reasoning_sample(rng, i, split) for i in range(n)]
    raise ValueError(f"unknown embedded domain {domain!r}; known: {', '.join(DOMAINS)}")


# ----------------------------------------------------------------------------- storage (datasets)


def _to_row(sample: Sample) -> dict[str, Any]:
    video = None
    messages = []
    for message in sample.messages:
        content = message["content"]
        if isinstance(content, list):
            parts = []
            for part in content:
                if part["type"] == "video":
                    video = part["video"]
                    parts.append({"type": "video"})
                else:
                    parts.append(part)
            content = parts
        messages.append({"role": message["role"], "content": content})
    return {
        "id": sample.id,
        "domain": sample.domain,
        "messages": json.dumps(messages),
        "reference": json.dumps(sample.reference),
        "target": sample.target or "",
        "tools": json.dumps(sample.tools),
        "metadata": json.dumps(sample.metadata),
        "frames": video.frames.tobytes() if video is not None else b"",
        "frames_shape": list(video.frames.shape) if video is not None else [],
        "timestamps": list(video.timestamps) if video is not None else [],
        "captions": list(video.captions or []) if video is not None else [],
        "fps": float(video.fps or 0.0) if video is not None else 0.0,
    }


def _from_row(row: dict[str, Any]) -> Sample:
    messages = json.loads(row["messages"])
    for message in messages:
        if isinstance(message["content"], list):
            for part in message["content"]:
                if part["type"] == "video":
                    frames = np.frombuffer(row["frames"], dtype=np.uint8).reshape(row["frames_shape"])
                    part["video"] = VideoPart(
                        frames=frames, timestamps=list(row["timestamps"]), captions=list(row["captions"]) or None,
                        fps=row["fps"] or None,
                    )
    return Sample(
        id=row["id"],
        domain=row["domain"],
        messages=messages,
        reference=json.loads(row["reference"]),
        target=row["target"] or None,
        tools=json.loads(row["tools"]),
        metadata=json.loads(row["metadata"]),
    )


def build_suite(
    data_dir: str | Path, seed: int, n_train: int, n_eval: int, domains: tuple[str, ...] = DOMAINS,
    retrieval_lengths: tuple[int, ...] = (2, 4, 6), distractors: int = 0,
) -> Path:
    """Generate and store every domain's train and eval split under `data_dir` (skipped when already there);
    a non-default retrieval shape gets its own folder."""
    from datasets import disable_progress_bars

    disable_progress_bars()
    name = f"v{SUITE_VERSION}-seed{seed}"
    if tuple(retrieval_lengths) != (2, 4, 6) or distractors:
        name += f"-len{'.'.join(map(str, retrieval_lengths))}-dist{distractors}"
    root = Path(data_dir) / name
    for domain in domains:
        for split, n in (("train", n_train), ("eval", n_eval)):
            out = root / domain / split
            if (out / "dataset_info.json").exists() and len(load_from_disk(str(out))) == n:
                continue
            rows = [_to_row(s) for s in generate(domain, split, n, seed, tuple(retrieval_lengths), distractors)]
            Dataset.from_list(rows).save_to_disk(str(out))
    return root


@register_task_source("embedded")
class EmbeddedTasks(TaskSource):
    """One or more embedded domains of one split, read from the stored datasets (built on first use)."""

    name = "embedded"

    def __init__(
        self,
        data_dir: str = ".cache/embedded",
        split: str = "train",
        domains: list[str] | tuple[str, ...] = DOMAINS,
        seed: int = 0,
        n_train: int = 20000,
        n_eval: int = 64,
        limit: int | None = None,
        retrieval_lengths: list[int] | tuple[int, ...] = (2, 4, 6),
        retrieval_distractors: int = 0,
        where: dict[str, list] | None = None,
    ):
        """`where`: keep samples whose metadata value is listed, e.g. `{task: [add, sub], length: [2]}` (a
        sub-distribution: a generalist's narrower training mix, one haystack length ...)."""
        for domain in domains:
            if domain not in DOMAINS:
                raise ValueError(f"unknown embedded domain {domain!r}; known: {', '.join(DOMAINS)}")
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        root = build_suite(data_dir, seed, n_train, n_eval, tuple(domains), tuple(retrieval_lengths), retrieval_distractors)
        self.samples: list[Sample] = []
        for domain in domains:
            ds = load_from_disk(str(root / domain / split))
            if where:
                keep = [i for i, m in enumerate(ds["metadata"]) if _matches(json.loads(m), where)]
                if not keep:
                    raise ValueError(f"embedded {domain}/{split}: no sample matches where={where}")
                ds = ds.select(keep)
            rows = ds if limit is None else ds.select(range(min(limit, len(ds))))
            self.samples.extend(_from_row(r) for r in rows)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def __len__(self) -> int:
        return len(self.samples)


def _matches(metadata: dict[str, Any], where: dict[str, list]) -> bool:
    """Every `where` key the sample's metadata has takes one of the listed values (compared as text, so YAML
    numbers match stored ones); keys the sample lacks do not filter it."""
    return all(str(metadata[k]) in {str(v) for v in allowed} for k, allowed in where.items() if k in metadata)


def tokenizer_corpus(seed: int = 1, n: int = 300) -> Iterator[str]:
    """Text the embedded tokenizer is trained on: every domain's prompts and answers (the Video-RL tasks' too),
    and the timestamp format."""
    from tasks import embedded_video

    samples = [s for domain in DOMAINS for s in generate(domain, "train", n, seed)]
    samples += [s for task in embedded_video.TASKS for s in embedded_video.generate(task, "train", n // 3, seed)]
    for s in samples:
        for message in s.messages:
            content = message["content"]
            yield content if isinstance(content, str) else " ".join(p.get("text", "") for p in content)
        yield s.target or ""
        if s.tools:
            yield json.dumps(s.tools)
    for t in range(0, 64):
        yield f"<{t:.1f} seconds> <{t + 0.5:.1f} seconds>"


def embedded_tokenizer(data_dir: str | Path = ".cache/embedded", vocab_size: int = 1024):
    """The project tokenizer for the embedded suite, trained once and cached under `data_dir/tokenizer`."""
    from models.tokenizer import train_tokenizer
    from transformers import AutoTokenizer

    path = Path(data_dir) / f"tokenizer-v{SUITE_VERSION}-{vocab_size}"
    if (path / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(str(path))
    tokenizer = train_tokenizer(tokenizer_corpus(), vocab_size=vocab_size)
    tmp = path.with_name(path.name + ".tmp")
    tokenizer.save_pretrained(str(tmp))
    if not path.exists():
        tmp.rename(path)
    return AutoTokenizer.from_pretrained(str(path))
