"""Ray actors that host engines (rollout engines, teachers), and the pool that shards work over them.

One mechanism for both: an actor builds an object from `module:Class` and keyword arguments, then runs its
methods. A worker that dies or raises is reported with the pool's name, the worker index and what it was doing
(the first sample ids of its shard), never as a bare Ray traceback. `num_workers=0` hosts the object in the
calling process (tests, debugging, single-process runs).
"""

from __future__ import annotations

import importlib
import os
import socket
import threading
import time
from typing import Any
from collections.abc import Callable


class WorkerError(RuntimeError):
    """A hosted worker failed; the message says which pool, which worker and what it was doing."""


def build_object(target: str, kwargs: dict[str, Any]) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)(**kwargs)


class HostActor:
    """Hosts one object built from `target` ("module:Class"); `call` runs one of its methods."""

    def __init__(self, target: str, kwargs: dict[str, Any], threads: int, driver: tuple[str, int] | None = None):
        """`driver`: (host, pid) of the process that owns the job; an actor on the same host ends itself when that
        process is gone (a driver killed with -9 leaves a local Ray instance, and its actors, running)."""
        from models.factory import quiet_libraries

        if driver is not None and driver[0] == socket.gethostname():
            threading.Thread(target=_exit_with, args=(driver[1],), daemon=True, name="driver-watch").start()
        quiet_libraries()
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.obj = build_object(target, kwargs)

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.obj, method)(*args, **kwargs)

    def pid(self) -> int:
        return os.getpid()


def _exit_with(pid: int, every_s: float = 1.0) -> None:
    """End this process once process `pid` no longer exists."""
    while True:
        time.sleep(every_s)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            os._exit(1)
        except PermissionError:  # alive, owned by another user
            pass


def driver_identity() -> tuple[str, int]:
    """What actors watch: this host and process."""
    return socket.gethostname(), os.getpid()


def host_actor():
    """The Ray actor class around `HostActor` (Ray is imported only by jobs that use actors)."""
    global _REMOTE_HOST
    if _REMOTE_HOST is None:
        import ray

        _REMOTE_HOST = ray.remote(HostActor)
    return _REMOTE_HOST


_REMOTE_HOST = None


def ensure_ray(address: str | None) -> None:
    """Start (or connect to) Ray once per process. Locally, actors reserve no CPU: the loop runs them in turn.
    The job's actors die with the driver: Ray ends a driver's non-detached actors when its process exits."""
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, ignore_reinit_error=True)
    else:
        ray.init(
            include_dashboard=False,
            ignore_reinit_error=True,
            log_to_driver=True,
            configure_logging=False,
            num_cpus=os.cpu_count(),
        )


class ActorPool:
    """`num_workers` hosted copies of one object; `map` shards a list over them and concatenates results."""

    def __init__(
        self,
        name: str,
        target: str,
        kwargs: dict[str, Any],
        num_workers: int = 1,
        threads: int = 0,
        gpus_per_worker: float = 0.0,
        ray_address: str | None = None,
        bundles: list[tuple[Any, int]] | None = None,
    ):
        """`bundles`: (placement group, bundle index) per worker from the job's placement plan
        (`rl.placement.ray_bundles`); GPU workers need them."""
        self.name = name
        self.local = None
        self.actors: list[Any] = []
        if num_workers == 0:
            self.local = build_object(target, kwargs)
            return
        ensure_ray(ray_address)
        actor_class = host_actor()
        options: dict[str, Any] = {"num_cpus": 0, "num_gpus": gpus_per_worker, "max_concurrency": 1}
        if gpus_per_worker > 0:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            if bundles is None or len(bundles) != num_workers:
                raise ValueError(f"{name}: {num_workers} GPU workers need as many placement bundles from the plan")
            self.actors = [
                actor_class.options(
                    **options,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i),
                ).remote(target, kwargs, threads, driver_identity())
                for group, i in bundles
            ]
        else:
            self.actors = [actor_class.options(**options).remote(target, kwargs, threads, driver_identity())
                           for _ in range(num_workers)]
        # Surface construction errors (missing model folder, bad kwargs) now, with the pool's name.
        self._gather([a.pid.remote() for a in self.actors], ["starting"] * len(self.actors))

    @property
    def size(self) -> int:
        return 1 if self.local is not None else len(self.actors)

    def map(
        self,
        method: str,
        items: list[Any],
        *extra_lists: list[Any],
        describe: Callable[[list[Any]], str] = lambda shard: f"{len(shard)} items",
        combine: Callable[[list[Any]], Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Call `method(shard, *extra_shards, shard_index=i, **kwargs)` on contiguous shards; combine results."""
        if self.local is not None:
            try:
                return getattr(self.local, method)(items, *extra_lists, shard_index=0, **kwargs)
            except Exception as err:
                raise WorkerError(f"{self.name} (in-process) failed while {method} on {describe(items)}: {err}") from err
        n = len(self.actors)
        bounds = [len(items) * i // n for i in range(n + 1)]
        futures, doing = [], []
        for i, actor in enumerate(self.actors):
            lo, hi = bounds[i], bounds[i + 1]
            if lo == hi:
                continue
            shard_args = [items[lo:hi]] + [lst[lo:hi] for lst in extra_lists]
            futures.append(actor.call.remote(method, *shard_args, shard_index=i, **kwargs))
            doing.append(f"worker {i} {method} on {describe(items[lo:hi])}")
        results = self._gather(futures, doing)
        return combine(results) if combine else results[0] if len(results) == 1 else results

    def broadcast(self, method: str, *args: Any, what: str = "") -> None:
        """Run `method(*args)` on every worker (weight sync); large args are put in the object store once."""
        if self.local is not None:
            getattr(self.local, method)(*args)
            return
        import ray

        refs = [ray.put(a) for a in args]
        self._gather([a.call.remote(method, *refs) for a in self.actors], [f"worker {i} {what or method}" for i in range(len(self.actors))])

    def _gather(self, futures: list[Any], doing: list[str]) -> list[Any]:
        import ray

        out = []
        for future, what in zip(futures, doing):
            try:
                out.append(ray.get(future))
            except ray.exceptions.RayActorError as err:
                raise WorkerError(f"{self.name}: {what}: the actor died ({type(err).__name__}: {err})") from err
            except ray.exceptions.RayTaskError as err:
                cause = err.cause if getattr(err, "cause", None) is not None else err
                raise WorkerError(f"{self.name}: {what}: {type(cause).__name__}: {cause}") from err
        return out

    def shutdown(self) -> None:
        if self.actors:
            import ray
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
