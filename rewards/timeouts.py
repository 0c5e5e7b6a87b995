"""A time limit on work done in this process (in-process reward scoring, importing a reward's module).

Why a thread: Python cannot interrupt arbitrary code in its own thread safely, and a worker process is what
`num_workers: 0` opts out of. The call runs in a daemon thread; when it overruns, the caller gets
`RewardTimeout` and carries on, and the thread is abandoned (it cannot be killed: a reward stuck in a loop keeps a
core busy until the process exits, which is why worker processes stay the default).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class RewardTimeout(TimeoutError):
    """A reward call (or a reward module's import) did not finish within its limit."""


class _Runner:
    """One daemon thread executing calls in order; replaced when a call overruns (the old one is abandoned)."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._serve, name="reward-inline", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            fn, box, done = self.jobs.get()
            try:
                box.append((True, fn()))
            except BaseException as exc:  # noqa: BLE001 - handed back to the caller as is
                box.append((False, exc))
            done.set()


_runner: _Runner | None = None
_lock = threading.Lock()


def call_with_timeout(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """`fn()`'s result (or its exception), or `RewardTimeout(f"{what}: timed out after ...")`."""
    global _runner
    with _lock:
        if _runner is None:
            _runner = _Runner()
        runner = _runner
    box: list[tuple[bool, Any]] = []
    done = threading.Event()
    runner.jobs.put((fn, box, done))
    if not done.wait(timeout_s):
        with _lock:
            if _runner is runner:
                _runner = None  # the stuck thread keeps its call; later calls get a fresh thread
        raise RewardTimeout(f"{what}: timed out after {timeout_s:g}s (abandoned in its thread)")
    ok, value = box[0]
    if ok:
        return value
    raise value
