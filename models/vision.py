"""Frames -> the Qwen-VL video inputs, without the video processor (which needs torchvision).

Layout (Qwen2-VL patch order, see the shared note on Qwen3-VL video inputs): frames `[T, H, W, 3]` uint8 become
`pixel_values_videos [gt*gh*gw, 3*tp*p*p]` ordered temporal group -> merged row block -> merged column block ->
row in block -> column in block, each row flattened as (channel, temporal, y, x); `video_grid_thw` has one
`[1, gh, gw]` row per temporal group because Qwen3-VL separates groups by timestamp text.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# CLIP/Qwen-VL normalisation constants (the image processor's defaults).
IMAGE_MEAN = np.array([0.5, 0.5, 0.5], dtype=np.float32)
IMAGE_STD = np.array([0.5, 0.5, 0.5], dtype=np.float32)


@dataclass(frozen=True)
class VisionLayout:
    """The few numbers of a vision tower that decide how frames become tokens."""

    patch_size: int
    temporal_patch_size: int
    merge_size: int

    @classmethod
    def from_config(cls, vision_config) -> VisionLayout:
        return cls(
            patch_size=int(vision_config.patch_size),
            temporal_patch_size=int(vision_config.temporal_patch_size),
            merge_size=int(vision_config.spatial_merge_size),
        )

    def tokens_per_group(self, height: int, width: int) -> int:
        """LLM tokens for one temporal group of frames of this size (after spatial merging)."""
        return (height // self.patch_size) * (width // self.patch_size) // (self.merge_size**2)


@dataclass
class VideoTensors:
    """One clip ready for the model: `pixels [N, C*tp*p*p]`, `grid_thw [gt, 3]`, `group_times [gt]` seconds."""

    pixels: torch.Tensor
    grid_thw: torch.Tensor
    group_times: list[float]
    tokens_per_group: int


def video_to_tensors(frames: np.ndarray, timestamps: list[float], layout: VisionLayout) -> VideoTensors:
    """Patchify a clip. Frames `[T, H, W, 3]` uint8; T is padded (last frame repeated) to a multiple of tp.

    H and W must be multiples of `patch_size * merge_size` (the error says which is off).
    """
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got shape {tuple(frames.shape)}")
    p, tp, m = layout.patch_size, layout.temporal_patch_size, layout.merge_size
    t, h, w, _ = frames.shape
    if h % (p * m) or w % (p * m):
        raise ValueError(f"frame size {h}x{w} is not a multiple of patch_size*merge_size = {p * m}")
    if len(timestamps) != t:
        raise ValueError(f"{len(timestamps)} timestamps for {t} frames")
    pad = (-t) % tp
    if pad:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)], axis=0)
        timestamps = list(timestamps) + [timestamps[-1]] * pad
    x = (frames.astype(np.float32) / 255.0 - IMAGE_MEAN) / IMAGE_STD  # [T, H, W, C]
    x = x.transpose(0, 3, 1, 2)  # [T, C, H, W]
    gt, gh, gw = x.shape[0] // tp, h // p, w // p
    c = x.shape[1]
    x = x.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    # -> gt, gh/m, gw/m, m(row), m(col), c, tp, p(y), p(x)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pixels = torch.from_numpy(np.ascontiguousarray(x).reshape(gt * gh * gw, c * tp * p * p))
    grid = torch.tensor([[1, gh, gw]] * gt, dtype=torch.long)
    group_times = [float(timestamps[i * tp]) for i in range(gt)]
    return VideoTensors(pixels, grid, group_times, layout.tokens_per_group(h, w))
