"""Decode the next batches' videos in background workers while the current step trains.

`PrefetchingStream` wraps a prompt stream (anything with `next_batch(n)`, `state_dict()`, `load_state_dict()`
whose batches are consecutive runs of one sample sequence, as `rl.data.PromptStream`'s are). It draws samples
from the wrapped stream ahead of time, one at a time, submits each one's decoding to a thread pool (PyAV
releases the GIL while it decodes) and hands them back in the wrapped stream's order.

Exact resume: with every sample drawn ahead, the wrapped stream's own position runs ahead of what training has
seen. So the wrapped stream's state is recorded after each drawn sample, and `state_dict()` is the state after
the last sample *returned*; restoring it and drawing again yields the same samples an uninterrupted run gets.

Broken videos: a sample whose video is missing or corrupt (`VideoDecodeError`) is dropped and the next sample
takes its place; the drop is kept in `.skipped` as (sample id, reason) and counted in `metrics()`. Only a
stream where `max_consecutive_skips` samples in a row fail raises (a wrong data root, not a bad file).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any

from tasks.base import Sample
from tasks.video_io import DEFAULT_MULTIPLE, DEFAULT_SIZE, VideoDecodeError, decode_sample, has_undecoded_video


def _done(value: Any) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


class PrefetchingStream:
    """Batches of decoded samples, decoded `prefetch_batches` batches ahead by `workers` threads.

    decode: sample -> decoded sample (raising `VideoDecodeError` for a broken video); the default decodes with
        `tasks.video_io.decode_sample(sample, fps, max_frames, size, multiple)`.
    """

    def __init__(
        self,
        stream: Any,
        fps: float | None = 2.0,
        max_frames: int = 32,
        size: int | tuple[int, int] | None = DEFAULT_SIZE,
        multiple: int = DEFAULT_MULTIPLE,
        workers: int = 2,
        prefetch_batches: int = 2,
        max_consecutive_skips: int = 64,
        decode: Callable[[Sample], Sample] | None = None,
    ):
        if workers < 1 or prefetch_batches < 0 or max_consecutive_skips < 1:
            raise ValueError("workers and max_consecutive_skips must be >= 1 and prefetch_batches >= 0")
        self.stream = stream
        self.decode = decode or partial(decode_sample, fps=fps, max_frames=max_frames, size=size, multiple=multiple)
        self.prefetch_batches = prefetch_batches
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped: list[tuple[str, str]] = []  # (sample id, reason), this process's drops
        self._skipped_before = 0  # drops of the run before a resume (only their count is checkpointed)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="video-decode")
        # (sample id, future of the decoded sample, wrapped stream's state right after drawing this sample)
        self._pending: deque[tuple[str, Future, dict]] = deque()
        self._returned_state = stream.state_dict()
        self._batch_size = 0
        self._last_wait_s = 0.0
        self._last_skipped = 0

    # ------------------------------------------------------------------ stream protocol

    def next_batch(self, n: int) -> list[Sample]:
        """`n` decoded samples in the wrapped stream's order (broken ones replaced by the samples after them)."""
        self._batch_size = n
        t0 = time.perf_counter()
        batch: list[Sample] = []
        skipped_before = len(self.skipped)
        run = 0
        while len(batch) < n:
            if not self._pending:
                self._draw(n - len(batch))
            sample_id, future, state = self._pending.popleft()
            try:
                sample = future.result()
            except VideoDecodeError as err:
                self.skipped.append((sample_id, err.reason))
                self._returned_state = state
                run += 1
                if run >= self.max_consecutive_skips:
                    raise RuntimeError(
                        f"{run} samples in a row have unusable videos (last: {sample_id!r}: {err}); "
                        "is the video folder right?"
                    ) from err
                continue
            run = 0
            batch.append(sample)
            self._returned_state = state
        self._last_wait_s = time.perf_counter() - t0
        self._last_skipped = len(self.skipped) - skipped_before
        self._draw(self.prefetch_batches * n - len(self._pending))  # the next batches decode while this one trains
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The wrapped stream's state after the last sample returned, and the skip count so far."""
        return {"stream": dict(self._returned_state), "skipped_videos": self.skipped_total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()` (or a bare wrapped-stream state, as checkpoints of a plain stream hold)."""
        self._discard_pending()
        inner = state["stream"] if "stream" in state else state
        self.stream.load_state_dict(inner)
        self._returned_state = self.stream.state_dict()
        self._skipped_before = int(state.get("skipped_videos", 0)) if "stream" in state else 0
        self.skipped = []

    @property
    def skipped_total(self) -> int:
        """Samples dropped for unusable videos since the run started (across resumes)."""
        return self._skipped_before + len(self.skipped)

    # ------------------------------------------------------------------ reporting and shutdown

    def metrics(self) -> dict[str, float]:
        """`data/skipped_videos` (total so far), `data/skipped_videos_step` (in the last batch) and
        `data/prefetch_wait_s` (time the last `next_batch` waited on decoding: near 0 when prefetch keeps up)."""
        return {
            "data/skipped_videos": float(self.skipped_total),
            "data/skipped_videos_step": float(self._last_skipped),
            "data/prefetch_wait_s": self._last_wait_s,
        }

    def close(self) -> None:
        """Stop the workers (pending decodes are dropped)."""
        self._discard_pending()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> PrefetchingStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _draw(self, count: int) -> None:
        """Draw `count` samples from the wrapped stream and queue their decoding."""
        for _ in range(max(0, count)):
            (sample,) = self.stream.next_batch(1)
            state = self.stream.state_dict()
            future = self._pool.submit(self.decode, sample) if has_undecoded_video(sample) else _done(sample)
            self._pending.append((sample.id, future, state))

    def _discard_pending(self) -> None:
        while self._pending:
            _, future, _ = self._pending.popleft()
            future.cancel()


def decode_samples(
    samples: list[Sample],
    fps: float | None = 2.0,
    max_frames: int = 32,
    size: int | tuple[int, int] | None = DEFAULT_SIZE,
    multiple: int = DEFAULT_MULTIPLE,
    workers: int = 2,
) -> tuple[list[Sample], list[tuple[str, str]]]:
    """Decode a fixed list (an eval split) in parallel: (decoded samples in input order, skipped (id, reason))."""
    decode = partial(decode_sample, fps=fps, max_frames=max_frames, size=size, multiple=multiple)
    out: list[Sample] = []
    skipped: list[tuple[str, str]] = []
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="video-decode") as pool:
        futures = [pool.submit(decode, s) if has_undecoded_video(s) else _done(s) for s in samples]
        for sample, future in zip(samples, futures):
            try:
                out.append(future.result())
            except VideoDecodeError as err:
                skipped.append((sample.id, err.reason))
    return out, skipped
