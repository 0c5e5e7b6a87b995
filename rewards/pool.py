"""A small pool of reward worker processes with a per-call timeout.

Why not `multiprocessing.Pool`: it cannot kill one hung task, and its spawn/forkserver children re-import the
trainer's main module (and with it torch). Here each worker is a plain `python -m rewards.worker` subprocess
talking over two pipes; a worker silent for longer than the timeout is SIGKILLed and replaced, the unit it was on
is reported as timed out and the rest of its job is queued again.

The timeout covers one call of the reward function: one sample for per-sample rewards, the whole job for
batched (TRL-style) ones. Loading a reward spec in a fresh worker gets `load_timeout_s` (default 30 s).
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from rewards.registry import Outcome

_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


@dataclass
class Job:
    """Samples of one reward spec. indices: positions in the caller's batch; items: what the worker needs."""

    key: str
    spec: Any
    indices: list[int]
    items: list[tuple[Any, ...]]
    id: int = 0
    plan: list[int] | None = None
    finished: int = 0  # items done so far
    unit: int = 0  # index into plan


@dataclass
class _Worker:
    proc: subprocess.Popen
    inbox: Connection  # parent writes
    outbox: Connection  # parent reads
    tmpdir: str  # the worker's TMPDIR: sandboxes of a killed worker cannot clean up after themselves
    job: Job | None = None
    deadline: float = field(default=float("inf"))


class WorkerPool:
    def __init__(self, num_workers: int, timeout_s: float, base_dir: str | None = None, preload: tuple[str, ...] = (),
                 load_timeout_s: float = 30.0):
        if num_workers < 1:
            raise ValueError("WorkerPool needs num_workers >= 1")
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.load_timeout_s = float(load_timeout_s)
        self.init = {
            "sys_path": [os.path.abspath(p or ".") for p in sys.path],
            "preload": list(preload),
            "base_dir": base_dir,
        }
        self._workers: list[_Worker] = []
        self._ids = itertools.count()
        self.restarts = 0

    # -- process management --------------------------------------------------------------------------------------

    def _spawn(self) -> _Worker:
        to_child_r, to_child_w = os.pipe()
        to_parent_r, to_parent_w = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
        tmpdir = env["TMPDIR"] = tempfile.mkdtemp(prefix="reward_worker_")
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "rewards.worker", str(to_child_r), str(to_parent_w)],
                pass_fds=(to_child_r, to_parent_w),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        finally:
            os.close(to_child_r)
            os.close(to_parent_w)
        worker = _Worker(proc, Connection(to_child_w, readable=False), Connection(to_parent_r, writable=False), tmpdir)
        worker.inbox.send(self.init)
        return worker

    def _kill(self, worker: _Worker) -> None:
        worker.proc.kill()
        worker.proc.wait()
        worker.inbox.close()
        worker.outbox.close()
        shutil.rmtree(worker.tmpdir, ignore_errors=True)

    def _ensure_workers(self) -> None:
        alive = []
        for worker in self._workers:
            if worker.proc.poll() is None and worker.job is None:
                alive.append(worker)
            else:  # dead, or still busy with a run that was interrupted (KeyboardInterrupt): its replies are stale
                self._kill(worker)
        while len(alive) < self.num_workers:
            alive.append(self._spawn())
        self._workers = alive

    def close(self) -> None:
        """Ask workers to exit, then kill the ones that do not within 2 s."""
        for worker in self._workers:
            try:
                worker.inbox.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + 2.0
        for worker in self._workers:
            try:
                worker.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            self._kill(worker)
        self._workers = []

    # -- running -------------------------------------------------------------------------------------------------

    def run(self, jobs: list[Job], stop=None) -> dict[int, Outcome]:
        """Outcome per batch index for every item of `jobs`; never blocks longer than the timeouts allow.
        `stop(results)`, asked after each new failure: True returns at once with what is done (workers still busy
        are replaced at the next run)."""
        self._ensure_workers()
        results: dict[int, Outcome] = {}
        pending = deque(jobs)
        while pending or any(w.job for w in self._workers):
            failures = sum(1 for o in results.values() if o.error) if stop is not None else 0
            for worker in self._workers:
                if worker.job is None and pending:
                    self._submit(worker, pending.popleft())
            busy = [w for w in self._workers if w.job is not None]
            timeout = max(0.0, min(w.deadline for w in busy) - time.monotonic())
            ready = set(wait([w.outbox for w in busy], timeout=timeout))
            for index, worker in enumerate(self._workers):
                if worker.job is None:
                    continue
                if worker.outbox in ready:
                    try:
                        message = worker.outbox.recv()
                    except (EOFError, OSError):
                        code = worker.proc.wait()
                        self._replace(index, results, pending, f"reward worker process died (exit code {code})")
                        continue
                    self._handle(worker, message, results)
                elif time.monotonic() >= worker.deadline:
                    phase = "loading the reward" if worker.job.plan is None else "the reward call"
                    limit = self.load_timeout_s if worker.job.plan is None else self.timeout_s
                    self._replace(index, results, pending, f"timed out after {limit:g}s ({phase}); worker killed")
            if stop is not None and sum(1 for o in results.values() if o.error) > failures and stop(results):
                return results
        return results

    def _submit(self, worker: _Worker, job: Job) -> None:
        job.id, job.plan, job.finished, job.unit = next(self._ids), None, 0, 0
        worker.inbox.send((job.id, job.key, job.spec, job.items))  # pickles first: a failure leaves the worker idle
        worker.job = job
        worker.deadline = time.monotonic() + self.load_timeout_s

    def _handle(self, worker: _Worker, message: tuple, results: dict[int, Outcome]) -> None:
        kind, job_id, payload = message
        job = worker.job
        assert job is not None and job_id == job.id, f"reward worker answered job {job_id}, expected {job.id}"
        if kind == "plan":
            job.plan = payload
        elif kind == "done":
            for offset, outcome in enumerate(payload):
                results[job.indices[job.finished + offset]] = Outcome(*outcome)
            job.finished += len(payload)
            job.unit += 1
        elif kind == "fatal":
            for index in job.indices[job.finished :]:
                results[index] = Outcome(0.0, (), payload)
            job.finished = len(job.indices)
        worker.deadline = time.monotonic() + self.timeout_s
        if job.finished >= len(job.indices):
            worker.job, worker.deadline = None, float("inf")

    def _replace(self, index: int, results: dict[int, Outcome], pending: deque, reason: str) -> None:
        """Fail the unit the worker was on, queue the rest of its job first, start a fresh worker."""
        worker = self._workers[index]
        job = worker.job
        assert job is not None
        if job.plan is None:
            failed = len(job.indices) - job.finished
        else:
            failed = job.plan[job.unit] if job.unit < len(job.plan) else len(job.indices) - job.finished
        stop = job.finished + failed
        for i in job.indices[job.finished : stop]:
            results[i] = Outcome(0.0, (), reason)
        if stop < len(job.indices):
            pending.appendleft(Job(job.key, job.spec, job.indices[stop:], job.items[stop:]))
        self._kill(worker)
        self.restarts += 1
        self._workers[index] = self._spawn()
