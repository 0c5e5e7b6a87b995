"""Real video decoding (PyAV) and the prefetching stream: timestamps from pts, colours on a known schedule,
broken files named, same order and exact resume with background decoding."""

from __future__ import annotations

import threading
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from rl.data import PromptStream
from tasks.base import Sample, VideoPart
from tasks.prefetch import PrefetchingStream, decode_samples
from tasks.video_io import VideoDecodeError, decode_sample, decode_video, output_size, target_times

PALETTE = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230)}
# 3 s at 10 fps: red for t < 1, green for 1 <= t < 2, blue after.
SCHEDULE = [((0.0, 1.0), "red"), ((1.0, 2.0), "green"), ((2.0, 3.0), "blue")]
# (file name, codec, pixel format): mp4/h264, webm/vp9, mkv/ffv1 (lossless), avi/mpeg4, mov/mjpeg
FORMATS = [
    ("clip.mp4", "libx264", "yuv420p"),
    ("clip.webm", "libvpx-vp9", "yuv420p"),
    ("clip.mkv", "ffv1", "yuv444p"),
    ("clip.avi", "mpeg4", "yuv420p"),
    ("clip.mov", "mjpeg", "yuvj420p"),
]


def colour_at(t: float) -> str:
    return next(name for (s, e), name in SCHEDULE if s <= t < e)


def write_video(path: Path, codec: str, pix_fmt: str, times: list[float], width: int = 64, height: int = 48,
                tick: Fraction = Fraction(1, 1000), rate: int = 10) -> Path:
    """Encode solid frames coloured by `colour_at(t)` at the given presentation times (seconds)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.codec_context.time_base = tick
        for t in times:
            image = np.empty((height, width, 3), dtype=np.uint8)
            image[:] = PALETTE[colour_at(t)]
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = int(round(Fraction(t).limit_denominator(1000) / tick))
            frame.time_base = tick
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def nearest_colour(pixel: np.ndarray) -> str:
    return min(PALETTE, key=lambda name: float(np.abs(np.asarray(PALETTE[name]) - pixel.astype(float)).sum()))


def video_sample(path: Path | str, sid: str) -> Sample:
    part = VideoPart(path=str(path))
    return Sample(id=sid, domain="video", reference=[0.0, 1.0],
                  messages=[{"role": "user", "content": [{"type": "video", "video": part},
                                                         {"type": "text", "text": "When is it red?"}]}])


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("clips")
    times = [i / 10 for i in range(30)]
    return {name: write_video(folder / name, codec, pix, times) for name, codec, pix in FORMATS}


@pytest.mark.parametrize("name", [f[0] for f in FORMATS])
def test_decode_at_2fps_follows_the_colour_schedule(clips, name):
    decoded = decode_video(clips[name], fps=2, max_frames=16, size=(32, 32))
    assert decoded.frames.dtype == np.uint8 and decoded.frames.shape == (6, 32, 32, 3)
    assert decoded.timestamps == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5], abs=1e-6)
    assert decoded.fps == 2 and decoded.duration == pytest.approx(3.0)
    seen = [nearest_colour(f[16, 16]) for f in decoded.frames]
    assert seen == ["red", "red", "green", "green", "blue", "blue"]
    # solid frames stay solid after resizing: every pixel is close to its frame's colour
    for frame, colour in zip(decoded.frames, seen):
        assert np.abs(frame.astype(int) - np.asarray(PALETTE[colour])).max() < 24


@pytest.mark.parametrize("name", ["clip.mp4", "clip.webm"])
def test_max_frames_spreads_frames_uniformly_over_the_clip(clips, name):
    decoded = decode_video(clips[name], fps=2, max_frames=4, size=(32, 32))
    # targets 0, 1, 2, 3 s; the frame on screen at 3 s is the last one, shown from 2.9 s
    assert decoded.timestamps == pytest.approx([0.0, 1.0, 2.0, 2.9], abs=1e-6)
    assert [nearest_colour(f[8, 8]) for f in decoded.frames] == ["red", "green", "blue", "blue"]
    assert decoded.fps == pytest.approx(1.0)


def test_every_frame_when_fps_is_none(clips):
    decoded = decode_video(clips["clip.mkv"], fps=None, max_frames=100, size=(32, 32))
    assert len(decoded.frames) == 30 and decoded.fps == 10
    assert decoded.timestamps == pytest.approx([i / 10 for i in range(30)], abs=1e-6)


def test_timestamps_come_from_pts_for_variable_frame_rate(tmp_path):
    # 10 fps for the first second, then frames only every 0.5 s: a fixed-rate assumption would put frame 12 at 1.2 s
    times = [i / 10 for i in range(10)] + [1.0, 1.5, 2.0, 2.5]
    path = write_video(tmp_path / "vfr.mkv", "ffv1", "yuv444p", times)
    decoded = decode_video(path, fps=4, max_frames=64, size=(32, 32))
    # targets every 0.25 s; after 1 s the frame on screen is the latest one shown, each kept once
    assert decoded.timestamps == pytest.approx([0.0, 0.2, 0.5, 0.7, 1.0, 1.5, 2.0, 2.5], abs=1e-6)
    assert [nearest_colour(f[0, 0]) for f in decoded.frames] == [colour_at(t) for t in decoded.timestamps]


def test_duration_from_packets_when_the_container_declares_none(clips, monkeypatch):
    import tasks.video_io as video_io

    monkeypatch.setattr(video_io, "_declared_duration", lambda container, stream: None)
    decoded = decode_video(clips["clip.webm"], fps=2, max_frames=4, size=(32, 32))
    assert decoded.duration == pytest.approx(3.0)  # last packet at 2.9 s lasting 0.1 s
    assert decoded.timestamps == pytest.approx([0.0, 1.0, 2.0, 2.9], abs=1e-6)  # decoding restarts at the start


def test_output_size_rules():
    assert output_size(480, 640, (64, 96), 32) == (64, 96)
    assert output_size(480, 640, 64, 32) == (64, 64)  # 64 * 480/640 = 48 -> 1.5 multiples, rounds half up to 2
    assert output_size(360, 640, 128, 32) == (64, 128)  # 128 * 360/640 = 72 -> 2.25 multiples -> 2
    assert output_size(640, 360, 128, 32) == (128, 64)  # portrait keeps the long side vertical
    assert output_size(100, 2000, 64, 32) == (32, 64)  # never below one multiple
    with pytest.raises(ValueError, match="multiple of 32"):
        output_size(480, 640, (48, 64), 32)
    with pytest.raises(ValueError, match="multiple of 16"):
        output_size(480, 640, 40, 16)


def test_keep_aspect_size_decodes_to_rounded_shape(clips):
    decoded = decode_video(clips["clip.mp4"], fps=1, max_frames=8, size=64, multiple=16)  # 64x48 source
    assert decoded.frames.shape == (3, 48, 64, 3)


def test_target_times():
    assert target_times(3.0, 2, 16) == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert target_times(3.0, 2, 3) == [0.0, 1.5, 3.0]
    assert target_times(3.2, 1, 8) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        target_times(3.0, 2, 0)


def test_decode_sample_fills_a_copy(clips):
    sample = video_sample(clips["clip.avi"], "s-avi")
    out = decode_sample(sample, fps=2, max_frames=16, size=(32, 32))
    video = out.videos()[0]
    assert video.frames.shape == (6, 32, 32, 3) and video.fps == 2 and video.path == str(clips["clip.avi"])
    assert video.timestamps == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5], abs=1e-6)
    assert out.metadata["duration"] == pytest.approx(3.0)
    assert out.messages[0]["content"][1] == {"type": "text", "text": "When is it red?"}
    assert sample.videos()[0].frames is None and "duration" not in sample.metadata  # input untouched


def test_missing_file_names_file_and_sample(tmp_path):
    missing = tmp_path / "nowhere.mp4"
    with pytest.raises(VideoDecodeError) as info:
        decode_sample(video_sample(missing, "sample-17"))
    assert str(missing) in str(info.value) and "sample-17" in str(info.value)
    assert info.value.sample_id == "sample-17" and info.value.path == str(missing)


@pytest.mark.parametrize("kind", ["garbage", "truncated-mp4", "truncated-mkv", "empty"])
def test_corrupt_file_names_file_and_sample(clips, tmp_path, kind):
    if kind == "garbage":
        data = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    elif kind == "truncated-mp4":
        data = clips["clip.mp4"].read_bytes()[: clips["clip.mp4"].stat().st_size // 2]
    elif kind == "truncated-mkv":  # still decodes its first frames: caught by the declared duration
        data = clips["clip.mkv"].read_bytes()[: clips["clip.mkv"].stat().st_size // 3]
    else:
        data = b""
    bad = tmp_path / f"{kind}.{'mkv' if 'mkv' in kind else 'mp4'}"
    bad.write_bytes(data)
    with pytest.raises(VideoDecodeError) as info:
        decode_sample(video_sample(bad, f"bad-{kind}"))
    assert str(bad) in str(info.value) and f"bad-{kind}" in str(info.value)


# ----------------------------------------------------------------------------- prefetching stream


def _samples(clips, n: int, broken: set[int] = frozenset(), tmp: Path | None = None) -> list[Sample]:
    names = sorted(clips)
    out = []
    for i in range(n):
        path = (tmp / f"missing-{i}.mp4") if i in broken else clips[names[i % len(names)]]
        out.append(video_sample(path, f"s{i}"))
    return out


def _ids(batch: list[Sample]) -> list[str]:
    return [s.id for s in batch]


def test_prefetch_returns_the_plain_stream_order_with_decoded_frames(clips):
    samples = _samples(clips, 7)
    plain = PromptStream(samples, seed=3)
    expected = [_ids(plain.next_batch(3)) for _ in range(5)]  # crosses two epoch boundaries
    with PrefetchingStream(PromptStream(samples, seed=3), fps=2, max_frames=4, size=(32, 32), workers=2) as stream:
        got = []
        for _ in range(5):
            batch = stream.next_batch(3)
            assert all(s.videos()[0].frames.shape == (4, 32, 32, 3) for s in batch)
            got.append(_ids(batch))
        assert got == expected
        assert stream.skipped == [] and stream.metrics()["data/skipped_videos"] == 0


def test_prefetch_decodes_ahead_but_checkpoints_what_was_returned(clips):
    samples = _samples(clips, 10)
    inner = PromptStream(samples, seed=0)
    decoded_in: set[str] = set()

    def decode(sample):
        decoded_in.add(threading.current_thread().name)
        return decode_sample(sample, fps=1, max_frames=4)

    with PrefetchingStream(inner, workers=2, prefetch_batches=2, decode=decode) as stream:
        stream.next_batch(2)
        assert inner.state_dict()["position"] == 6  # 2 returned + 2 batches of 2 queued
        assert stream.state_dict()["stream"] == {"epoch": 0, "position": 2}
    assert decoded_in and all(name.startswith("video-decode") for name in decoded_in)  # off the caller's thread


def test_prefetch_skips_broken_videos_and_counts_them(clips, tmp_path):
    samples = _samples(clips, 8, broken={2, 5}, tmp=tmp_path)
    plain = PromptStream(samples, seed=1)
    order = [s.id for s in plain.next_batch(16)]
    good = [i for i in order if i not in ("s2", "s5")]
    with PrefetchingStream(PromptStream(samples, seed=1), fps=1, max_frames=4, workers=2) as stream:
        got = _ids(stream.next_batch(3)) + _ids(stream.next_batch(3))
        assert got == good[:6]  # each broken sample replaced by the one after it
        assert sorted(sid for sid, _ in stream.skipped) == ["s2", "s5"]
        assert all("file not found" in reason for _, reason in stream.skipped)
        assert stream.metrics()["data/skipped_videos"] == 2


def test_prefetch_state_dict_resumes_exactly(clips, tmp_path):
    samples = _samples(clips, 9, broken={4}, tmp=tmp_path)
    with PrefetchingStream(PromptStream(samples, seed=7), fps=1, max_frames=2, workers=2) as first:
        for _ in range(3):
            first.next_batch(4)  # into the second epoch
        state = first.state_dict()
        rest = [_ids(first.next_batch(4)) for _ in range(3)]
        skipped_total = first.metrics()["data/skipped_videos"]
    with PrefetchingStream(PromptStream(samples, seed=7), fps=1, max_frames=2, workers=2) as resumed:
        resumed.load_state_dict(state)
        assert [_ids(resumed.next_batch(4)) for _ in range(3)] == rest
        assert resumed.metrics()["data/skipped_videos"] == skipped_total
    # a bare PromptStream state (a checkpoint of a run without prefetching) loads too
    with PrefetchingStream(PromptStream(samples, seed=7), fps=1, max_frames=2) as bare:
        bare.load_state_dict(state["stream"])
        assert _ids(bare.next_batch(4)) == rest[0]


def test_prefetch_gives_up_when_every_video_is_broken(tmp_path):
    samples = [video_sample(tmp_path / f"gone{i}.mp4", f"g{i}") for i in range(3)]
    with PrefetchingStream(PromptStream(samples, seed=0), max_consecutive_skips=5) as stream:
        with pytest.raises(RuntimeError, match="in a row"):
            stream.next_batch(2)


def test_prefetch_passes_samples_with_frames_through(clips):
    frames = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    inline = Sample(id="inline", domain="video", reference=[0, 1], messages=[{"role": "user", "content": [
        {"type": "video", "video": VideoPart(frames=frames, timestamps=[0.0, 1.0])}]}])
    text = Sample(id="text", domain="reasoning", reference="1", messages=[{"role": "user", "content": "1?"}])
    with PrefetchingStream(PromptStream([inline, text], seed=0)) as stream:
        batch = stream.next_batch(2)
    assert {s.id for s in batch} == {"inline", "text"}
    assert next(s for s in batch if s.id == "inline").videos()[0].frames is frames


def test_decode_samples_for_eval_keeps_order_and_reports_skips(clips, tmp_path):
    samples = _samples(clips, 4, broken={1}, tmp=tmp_path)
    decoded, skipped = decode_samples(samples, fps=1, max_frames=2, workers=2)
    assert _ids(decoded) == ["s0", "s2", "s3"] and [sid for sid, _ in skipped] == ["s1"]
    assert all(s.videos()[0].frames is not None for s in decoded)
