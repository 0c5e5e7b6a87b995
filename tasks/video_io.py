"""Decode real video files into the frames a `VideoPart` carries (PyAV; mp4, webm, mkv, avi, mov, ...).

Sampling. Target times are `0, 1/fps, 2/fps, ...` below the clip's duration; when there would be more than
`max_frames` of them, `max_frames` times evenly spaced over `[0, duration]` instead (first and last frame
included). Each target time takes the frame *on screen* at that time (the latest frame whose time is <= it), and a
frame picked twice is kept once, so a clip never yields more frames than it holds. Reported timestamps are the
kept frames' own presentation times (pts x time base, relative to the stream's start), not the target grid: a
variable-frame-rate file or one with gaps reports where its frames really are.

Size. `size=(H, W)` resizes to exactly that (each side a multiple of `multiple`, the vision tower's
`patch_size * merge_size`); `size=S` (an int) keeps the aspect ratio: the longer side becomes S and the shorter
side is rounded to the nearest multiple of `multiple` (at least one multiple). The default is 32x32, the smallest
frame the Qwen3-VL layout (patch 16, merge 2) accepts. Only kept frames are converted and resized.

Failures. A missing, unreadable, undecodable or truncated file raises `VideoDecodeError` naming the file and the
sample. Containers written front-to-back (webm, mkv) still decode when cut short, so a file whose frames stop
before `min_coverage` of its declared duration is reported as truncated rather than silently used: its time
annotations would no longer match what the model sees.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

import numpy as np

from tasks.base import Sample, VideoPart

DEFAULT_SIZE = (32, 32)
DEFAULT_MULTIPLE = 32
# Frame times are compared with this slack: containers store times in ticks (webm/mkv: 1 ms).
_TIME_EPS = 1e-3


class VideoDecodeError(RuntimeError):
    """A video that cannot be used. `path` and `sample_id` say which; `reason` says why."""

    def __init__(self, path: str | os.PathLike, reason: str, sample_id: str | None = None):
        self.path = str(path)
        self.reason = reason
        self.sample_id = sample_id
        where = f" (sample {sample_id!r})" if sample_id is not None else ""
        super().__init__(f"cannot decode video {self.path!r}{where}: {reason}")


@dataclass
class DecodedVideo:
    """frames: uint8 `[T, H, W, 3]`; timestamps: `[T]` seconds from the stream start; fps: the sampling rate
    used (lower than requested when `max_frames` capped it); duration: seconds the clip lasts; source_fps: the
    stream's average frame rate (None when the container does not say)."""

    frames: np.ndarray
    timestamps: list[float]
    fps: float
    duration: float
    source_fps: float | None


def output_size(height: int, width: int, size: int | tuple[int, int] | None, multiple: int) -> tuple[int, int]:
    """The `(H, W)` frames are resized to (see module doc); ValueError when `size` is not a multiple of `multiple`."""
    if multiple <= 0:
        raise ValueError(f"multiple must be positive, got {multiple}")
    if size is None:
        size = DEFAULT_SIZE
    if isinstance(size, int):
        if size <= 0 or size % multiple:
            raise ValueError(f"size {size} is not a positive multiple of {multiple} (patch_size * merge_size)")
        long_side, short_side = max(height, width), min(height, width)
        short = max(multiple, int(math.floor(size * short_side / long_side / multiple + 0.5)) * multiple)
        return (size, short) if height >= width else (short, size)
    h, w = (int(x) for x in size)
    if h <= 0 or w <= 0 or h % multiple or w % multiple:
        raise ValueError(f"size {h}x{w} is not a multiple of {multiple} (patch_size * merge_size) on both sides")
    return h, w


def _grid_size(duration: float, fps: float) -> int:
    """How many times `0, 1/fps, ...` fall below `duration` (at least one)."""
    return max(1, int(math.ceil(duration * fps - 1e-9)))


def target_times(duration: float, fps: float, max_frames: int) -> list[float]:
    """Seconds at which frames are taken (see module doc): the `1/fps` grid, or `max_frames` evenly spaced
    times over `[0, duration]` when the grid would be longer."""
    if max_frames <= 0:
        raise ValueError(f"max_frames must be positive, got {max_frames}")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    n = _grid_size(duration, fps)
    if n <= max_frames:
        return [k / fps for k in range(n)]
    if max_frames == 1:
        return [0.0]
    return [duration * k / (max_frames - 1) for k in range(max_frames)]


def _declared_duration(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        import av

        return container.duration / av.time_base
    if stream.frames and stream.average_rate:
        return float(stream.frames / stream.average_rate)
    return None


def _demuxed_duration(container, stream, start: Fraction) -> float | None:
    """End time of the last packet (a demux pass, no decoding) for containers that declare no duration."""
    end = None
    for packet in container.demux(stream):
        ts = packet.pts if packet.pts is not None else packet.dts
        if ts is None:
            continue
        stop = (ts + (packet.duration or 0)) * stream.time_base - start
        end = stop if end is None else max(end, stop)
    container.seek(0)
    return None if end is None else float(end)


def decode_video(
    path: str | os.PathLike,
    fps: float | None = 2.0,
    max_frames: int = 32,
    size: int | tuple[int, int] | None = DEFAULT_SIZE,
    multiple: int = DEFAULT_MULTIPLE,
    sample_id: str | None = None,
    min_coverage: float = 0.5,
) -> DecodedVideo:
    """Decode, sample and resize the first video stream of `path` (see module doc for the rules).

    fps: sampling rate; None takes every frame (the stream's own rate), still capped at `max_frames`."""
    import av  # PyAV only where a video file is decoded (text-only jobs run without it)

    path = str(path)
    if not os.path.isfile(path):
        raise VideoDecodeError(path, "file not found", sample_id)
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoDecodeError(path, "no video stream", sample_id)
            stream = container.streams.video[0]
            out_h, out_w = output_size(stream.height or 1, stream.width or 1, size, multiple)
            start = Fraction(stream.start_time or 0) * (stream.time_base or 1)
            declared = _declared_duration(container, stream)
            if declared is None:
                declared = _demuxed_duration(container, stream, start)
            if declared is None or declared <= 0:
                raise VideoDecodeError(path, "the container gives no duration and its packets no timestamps", sample_id)
            source_fps = float(stream.average_rate) if stream.average_rate else None
            rate = fps if fps is not None else source_fps
            if rate is None:
                raise VideoDecodeError(path, "fps=None (every frame) but the stream declares no frame rate", sample_id)
            times = target_times(declared, rate, max_frames)
            frames, stamps, last_time, reached_end = _select_frames(
                container, stream, start, times, out_h, out_w, path, sample_id
            )
    except VideoDecodeError:
        raise
    except (av.FFmpegError, OSError, EOFError) as err:
        raise VideoDecodeError(path, f"{type(err).__name__}: {err}", sample_id) from err
    if not frames:
        raise VideoDecodeError(path, "no frame could be decoded", sample_id)
    duration = declared
    if reached_end:  # every frame was decoded: check the file delivers what it declares
        covered = last_time + (1.0 / source_fps if source_fps else 0.0)
        if covered < min_coverage * declared:
            raise VideoDecodeError(
                path, f"truncated: frames stop at {covered:.2f} s of a declared {declared:.2f} s", sample_id
            )
        duration = min(declared, covered)
    capped = _grid_size(declared, rate) > max_frames
    used_fps = (len(times) - 1) / declared if capped and len(times) > 1 else rate
    return DecodedVideo(
        frames=np.stack(frames), timestamps=stamps, fps=float(used_fps), duration=float(duration), source_fps=source_fps
    )


def _select_frames(container, stream, start, times, out_h, out_w, path, sample_id):
    """One decode pass keeping, for each target time, the latest frame at or before it. Returns (frames
    `[H, W, 3]` list, their timestamps, the last decoded frame's time, whether decoding ran to the end of the
    stream rather than stopping once every target time was served)."""
    kept: list[np.ndarray] = []
    stamps: list[float] = []
    k = 0  # next target time
    previous = None  # (time, frame) of the last decoded frame
    last_time = -1.0
    last_kept: list[float] = []  # raw time of the last kept frame

    def keep(t: float, frame) -> None:
        if last_kept and last_kept[-1] == t:
            return  # picked for an earlier target already
        last_kept.append(t)
        image = frame.reformat(width=out_w, height=out_h, format="rgb24", interpolation="AREA").to_ndarray()
        kept.append(np.ascontiguousarray(image, dtype=np.uint8))
        stamps.append(round(t, 6))

    for frame in container.decode(stream):
        if frame.pts is None:
            raise VideoDecodeError(path, "a decoded frame has no timestamp", sample_id)
        t = float(frame.pts * stream.time_base - start)
        if t < last_time - 1e-9:
            continue  # out-of-order frame (broken stream); times must increase
        while k < len(times) and t > times[k] + _TIME_EPS:
            keep(*(previous or (t, frame)))  # a target before the first frame takes the first frame
            k += 1
        if k >= len(times):
            return kept, stamps, last_time, False
        previous = (t, frame)
        last_time = t
    if previous is not None:
        keep(*previous)
    return kept, stamps, last_time, True


def decode_sample(
    sample: Sample,
    fps: float | None = 2.0,
    max_frames: int = 32,
    size: int | tuple[int, int] | None = DEFAULT_SIZE,
    multiple: int = DEFAULT_MULTIPLE,
    min_coverage: float = 0.5,
) -> Sample:
    """A copy of `sample` whose `VideoPart(path=...)` parts hold decoded frames, timestamps and fps (parts that
    already hold frames are kept as they are). The copy's metadata gets the clip `duration` (seconds) unless it
    has one, so that interval rewards clip predictions to the clip. The input sample is not modified."""
    messages = []
    duration = None
    for message in sample.messages:
        content = message["content"]
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") == "video" and part["video"].frames is None:
                    video: VideoPart = part["video"]
                    if not video.path:
                        raise VideoDecodeError("<none>", "video part has neither frames nor a path", sample.id)
                    decoded = decode_video(video.path, fps, max_frames, size, multiple, sample.id, min_coverage)
                    duration = decoded.duration if duration is None else duration
                    part = {**part, "video": replace(
                        video, frames=decoded.frames, timestamps=decoded.timestamps, fps=decoded.fps,
                    )}
                parts.append(part)
            content = parts
        messages.append({**message, "content": content})
    metadata = copy.deepcopy(sample.metadata)
    if duration is not None:
        metadata.setdefault("duration", duration)
    return replace(sample, messages=messages, metadata=metadata)


def has_undecoded_video(sample: Sample) -> bool:
    """Whether any video part of `sample` is known by path only."""
    return any(v.frames is None for v in sample.videos())


def video_paths(sample: Sample) -> list[Path]:
    """The paths of `sample`'s undecoded video parts."""
    return [Path(v.path) for v in sample.videos() if v.frames is None and v.path]
