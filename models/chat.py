"""Render chat messages (with video parts) into token ids and video tensors for one model.

The chat template is applied to text with a marker where each video goes; the text around the markers is
tokenised and each video becomes, per temporal group, its timestamp as text followed by
`<|vision_start|>` + `<|video_pad|>` x n + `<|vision_end|>` (the Qwen3-VL layout, which lets a model answer in
seconds). The same code serves the project's tiny tokenizer and the real Qwen3 one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from models.vision import VisionLayout, video_to_tensors

VIDEO_MARKER = "\x00VIDEO{}\x00"
_MARKER_RE = re.compile("\x00VIDEO(\\d+)\x00")

TEXT, IMAGE, VIDEO = 0, 1, 2


@dataclass
class RenderedPrompt:
    """A prompt for one model. `input_ids [L]`, `mm_token_type_ids [L]` (0 text, 2 video),
    `pixel_values_videos [N, D]` and `video_grid_thw [G, 3]` (None without video)."""

    input_ids: list[int]
    mm_token_type_ids: list[int]
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None

    @property
    def has_video(self) -> bool:
        return self.video_grid_thw is not None


def format_timestamp(seconds: float) -> str:
    return f"<{seconds:.1f} seconds>"


class ChatRenderer:
    """Turns messages into a `RenderedPrompt` for a tokenizer (and a vision layout, None for text-only models)."""

    def __init__(self, tokenizer, layout: VisionLayout | None = None, template_kwargs: dict[str, Any] | None = None):
        self.tokenizer = tokenizer
        self.layout = layout
        self.template_kwargs = dict(template_kwargs or {})
        vocab = tokenizer.get_vocab()
        self.video_pad = vocab.get("<|video_pad|>")
        self.vision_start = vocab.get("<|vision_start|>")
        self.vision_end = vocab.get("<|vision_end|>")
        self.eos_id = tokenizer.eos_token_id
        placeholders = ("<|video_pad|>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>")
        self.placeholder_ids = tuple(vocab[t] for t in placeholders if t in vocab)

    def render(self, messages: list[dict[str, Any]], tools: list[dict] | None = None) -> RenderedPrompt:
        flat, videos = _flatten_messages(messages)
        text = self.tokenizer.apply_chat_template(
            flat, tools=tools, tokenize=False, add_generation_prompt=True, **self.template_kwargs
        )
        ids: list[int] = []
        types: list[int] = []
        pixels, grids = [], []
        pieces = _MARKER_RE.split(text)
        for i, piece in enumerate(pieces):
            if i % 2 == 0:
                if piece:
                    piece_ids = self.tokenizer.encode(piece, add_special_tokens=False)
                    ids += piece_ids
                    types += [TEXT] * len(piece_ids)
                continue
            video = videos[int(piece)]
            if self.layout is None:
                raise ValueError("this model has no vision tower but the prompt holds a video: give it a text view")
            if video.frames is None:
                raise ValueError(f"video {video.path!r} was not decoded before rendering")
            if self.video_pad is None:
                raise ValueError("the tokenizer has no <|video_pad|> token")
            tensors = video_to_tensors(video.frames, video.timestamps, self.layout)
            for t in tensors.group_times:
                stamp = self.tokenizer.encode(format_timestamp(t), add_special_tokens=False)
                block = [self.vision_start] + [self.video_pad] * tensors.tokens_per_group + [self.vision_end]
                ids += stamp + block
                types += [TEXT] * (len(stamp) + 1) + [VIDEO] * tensors.tokens_per_group + [TEXT]
            pixels.append(tensors.pixels)
            grids.append(tensors.grid_thw)
        if not pixels:
            return RenderedPrompt(ids, types)
        return RenderedPrompt(ids, types, torch.cat(pixels), torch.cat(grids))

    def encode_response(self, text: str) -> list[int]:
        """A demonstration answer as response ids, closed by the end-of-turn token."""
        return self.tokenizer.encode(text, add_special_tokens=False) + [self.eos_id]

    def decode_response(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _flatten_messages(messages: list[dict[str, Any]]) -> tuple[list[dict[str, str]], list]:
    """Messages with string content (videos replaced by markers) and the videos in marker order."""
    flat, videos = [], []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            flat.append({"role": message["role"], "content": content})
            continue
        parts = []
        for part in content:
            kind = part.get("type")
            if kind == "text":
                parts.append(part["text"])
            elif kind == "video":
                parts.append(VIDEO_MARKER.format(len(videos)))
                videos.append(part["video"])
            else:
                raise ValueError(f"unknown message part type {kind!r}")
        flat.append({"role": message["role"], "content": "".join(parts)})
    return flat, videos
