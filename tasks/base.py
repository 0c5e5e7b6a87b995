"""The sample record every task source yields, and the registry of task sources.

A `Sample` is model-agnostic: chat messages whose user content may hold video parts. Turning it into token ids
(and pixel tensors) is the model side's job (`models.chat`), and a teacher may first swap the video for its text
rendition (`teachers.views`), which is why the video part carries timestamps and optional per-frame captions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable, Iterator

import numpy as np

from core.registry import Registry


@dataclass
class VideoPart:
    """A clip, by value (`frames`) or by reference (`path`, decoded in the data workers).

    frames: uint8 `[T, H, W, 3]` or None when only `path` is known yet.
    timestamps: seconds of each kept frame, `len == T` once decoded.
    captions: optional text rendition per frame (what a text-only teacher sees instead of pixels).
    """

    frames: np.ndarray | None = None
    path: str | None = None
    timestamps: list[float] = field(default_factory=list)
    captions: list[str] | None = None
    fps: float | None = None


@dataclass
class Sample:
    """One prompt with its reference answer.

    messages: chat messages `{"role", "content"}`; `content` is a string, or a list of parts
        (`{"type": "text", "text": ...}` / `{"type": "video", "video": VideoPart}`).
    domain: routing key for rewards and teachers ("video", "retrieval", "tool", "reasoning", ...).
    reference: JSON-serialisable ground truth read by the domain's reward.
    reward: reward name overriding the domain default, or None.
    target: a demonstration answer (for supervised warm-up of teachers and the base student), or None.
    tools: tool schemas offered to the model (rendered by the chat template), or None.
    metadata: per-sample facts kept for breakdowns (haystack length, needle depth, fps, source file ...).
    """

    id: str
    domain: str
    messages: list[dict[str, Any]]
    reference: Any
    reward: str | None = None
    target: str | None = None
    tools: list[dict[str, Any]] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def videos(self) -> list[VideoPart]:
        """The video parts of all messages, in order."""
        out = []
        for message in self.messages:
            content = message["content"]
            if isinstance(content, list):
                out.extend(part["video"] for part in content if part.get("type") == "video")
        return out


def prompt_text(sample: Sample) -> str:
    """The prompt as plain text: every message's text parts, one message per line (videos leave no text). What
    rewards see as `prompt`, in training and evaluation alike."""
    parts = []
    for message in sample.messages:
        content = message["content"]
        if isinstance(content, str):
            parts.append(content)
        else:
            parts.append(" ".join(p.get("text", "") for p in content if p.get("type") == "text"))
    return "\n".join(parts)


def prompt_messages(sample: Sample) -> list[dict[str, Any]]:
    """The prompt as chat messages of plain data (TRL's conversational `prompts`): text parts as they are, a
    video as `{"type": "video"}` without its frames, so the record is small, picklable and JSON-able."""
    out = []
    for message in sample.messages:
        content = message["content"]
        if not isinstance(content, str):
            content = [{"type": "video"} if p.get("type") == "video" else dict(p) for p in content]
        out.append({**message, "content": content})
    return out


class TaskSource:
    """Yields samples of one split. Subclasses implement `__iter__` and `__len__`; training and eval share them."""

    name: str = "task"

    def __iter__(self) -> Iterator[Sample]:  # pragma: no cover - interface
        raise NotImplementedError

    def __len__(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError


TASK_SOURCES: Registry[Callable[..., TaskSource]] = Registry("task source")


# The embedded suite's sources, imported on first use: `datasets` (their storage) is needed only by jobs that
# name them.
for _name, _target in {"embedded": "tasks.embedded:EmbeddedTasks",
                       "embedded_video": "tasks.embedded_video:EmbeddedVideoTasks",
                       "video_files": "tasks.embedded_video:VideoFileTasks",
                       "demonstrations": "tasks.demonstrations:DemonstrationTasks"}.items():
    TASK_SOURCES.register(_name, _target)


def register_task_source(name: str) -> Callable[[Callable[..., TaskSource]], Callable[..., TaskSource]]:
    """Decorator: make a task source constructible by name from YAML (`data.train: [{source: NAME, ...}]`)."""
    return TASK_SOURCES.register(name)


def get_task_source(name: str) -> Callable[..., TaskSource]:
    """The factory registered under `name`; the error names the closest known name."""
    return TASK_SOURCES.get(name)
