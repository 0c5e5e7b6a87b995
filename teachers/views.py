"""What a teacher sees of a sample. Cross-modal distillation: a text-only teacher gets a text rendition.

- native:     the student's prompt unchanged (pixels included);
- text:       each video replaced by its timestamped captions ("<2.0 seconds> red square" per frame);
- timestamps: each video replaced by its frame timestamps only (no content);
- no_video:   videos removed, the rest of the prompt kept.
"""

from __future__ import annotations

import copy
from typing import Any

from models.chat import format_timestamp
from tasks.base import Sample, VideoPart

VIEWS = ("native", "text", "timestamps", "no_video")


def video_as_text(video: VideoPart, with_captions: bool = True) -> str:
    """The text rendition of a clip: one line per frame, its timestamp then (optionally) its caption."""
    lines = []
    for i, t in enumerate(video.timestamps):
        caption = ""
        if with_captions:
            if not video.captions:
                raise ValueError("view 'text' needs per-frame captions, and this video has none")
            caption = " " + video.captions[i]
        lines.append(f"{format_timestamp(t)}{caption}")
    return "\n".join(lines) + "\n"


def view_messages(sample: Sample, view: str) -> list[dict[str, Any]]:
    """The sample's messages as the teacher with this view sees them."""
    if view not in VIEWS:
        raise ValueError(f"unknown teacher view {view!r}; known: {', '.join(VIEWS)}")
    if view == "native":
        return sample.messages
    out = []
    for message in sample.messages:
        content = message["content"]
        if isinstance(content, str):
            out.append(dict(message))
            continue
        texts = []
        for part in content:
            if part.get("type") == "text":
                texts.append(part["text"])
            elif part.get("type") == "video":
                if view == "text":
                    texts.append(video_as_text(part["video"], with_captions=True))
                elif view == "timestamps":
                    texts.append(video_as_text(part["video"], with_captions=False))
                # no_video: dropped
            else:
                raise ValueError(f"sample {sample.id}: unknown message part type {part.get('type')!r}")
        out.append({**{k: copy.copy(v) for k, v in message.items() if k != "content"}, "content": "".join(texts)})
    return out


def modality(sample: Sample) -> str:
    """'video' when any message holds a video part, else 'text' (the routing key next to the domain)."""
    return "video" if sample.videos() else "text"
