"""The controller's handle on the policy ranks: one interface, three ways the ranks were started.

- `LocalPolicyGroup`: one rank in the controller's process (CPU jobs, one GPU, tests).
- `TorchrunPolicyGroup`: the controller is rank 0 of a `torchrun` job; it broadcasts each call to the other ranks,
  which wait in `serve_policy_rank` (no Ray).
- `RayPolicyGroup`: N Ray actors, each hosting a `PolicyWorker` in one process group (a placement group's bundles).

Every call runs on all ranks at once (FSDP's collectives need every rank) and returns the combined result. A rank
that raises is reported with its rank, host and what it was doing, and the other ranks are stopped instead of
hanging in a collective (torchrun's agent ends them; the Ray group kills its actors; collectives time out after
`trainer.collective_timeout_s`).
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from rl.rollouts import Rollouts


class RankError(RuntimeError):
    """A training rank failed; the message names the rank, its host and what it was doing."""


def combine_pi_old(rollouts: Rollouts, parts: list[Any], device: torch.device | str) -> None:
    """Write each rank's pi_old rows back into the step's record."""
    b, t_len = rollouts.response_ids.shape
    old = torch.zeros(b, t_len)
    top = ref = None
    for part in parts:
        old[part.rows] = part.old
        if part.topk_ids is not None:
            top = torch.zeros(b, t_len, part.topk_ids.shape[-1], dtype=torch.long) if top is None else top
            top[part.rows] = part.topk_ids
        if part.ref is not None:
            ref = torch.zeros(b, t_len) if ref is None else ref
            ref[part.rows] = part.ref
    mask = rollouts.response_mask
    rollouts.old_logprobs = old.to(device) * mask
    if top is not None:
        rollouts.student_topk_ids = top.to(device)
    if ref is not None:
        rollouts.ref_logprobs = ref.to(device) * mask


class PolicyGroup:
    """What the controller calls. Subclasses define `_run(method, *args)` (every rank, results by rank) and
    `_stream(method, *args)` (rank 0's yields of a generator method, the other ranks draining theirs)."""

    world_size = 1
    device: torch.device = torch.device("cpu")

    def logprobs(self, rollouts: Rollouts) -> None:
        combine_pi_old(rollouts, self._run("logprobs", _on_cpu(rollouts)), rollouts.response_ids.device)

    def update(self, rollouts: Rollouts, step: int) -> dict[str, float]:
        return self._run("update", _on_cpu(rollouts), step)[0]

    def weight_buckets(self, max_mb: float) -> Iterator[dict[str, torch.Tensor]]:
        return self._stream("weight_buckets", max_mb)

    def save(self, folder) -> None:
        self._run("save", folder)

    def load(self, folder) -> None:
        self._run("load", folder)

    def export_hf(self, folder) -> None:
        self._run("export_hf", folder)

    def call(self, method: str, *args: Any) -> list[Any]:
        """Any worker method on every rank (tests, diagnostics): results by rank."""
        return self._run(method, *args)

    def close(self) -> None:
        pass


def _on_cpu(rollouts: Rollouts) -> Rollouts:
    """What crosses to other processes is on the CPU; each rank moves it to its own device."""
    return rollouts if rollouts.response_ids.device.type == "cpu" or not _crosses_processes() else rollouts.to("cpu")


def _crosses_processes() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


class LocalPolicyGroup(PolicyGroup):
    def __init__(self, cfg):
        from rl.policy import PolicyWorker

        self.worker = PolicyWorker(cfg)
        self.device = self.worker.device

    def _run(self, method: str, *args: Any) -> list[Any]:
        try:
            return [getattr(self.worker, method)(*args)]
        except Exception as err:
            raise RankError(f"policy rank 0 ({socket.gethostname()}) failed while {method}: "
                            f"{type(err).__name__}: {err}") from err

    def _stream(self, method: str, *args: Any) -> Iterator[Any]:
        yield from getattr(self.worker, method)(*args)

    def close(self) -> None:
        self.worker.close()


# ---------------------------------------------------------------------- torchrun

_STOP = "__stop__"


def init_torchrun_group(cfg) -> tuple[int, int, int]:
    """Join the torchrun job's process group (NCCL on GPU, gloo on CPU) with the configured collective timeout;
    returns (rank, world size, local rank). `trainer.world_size` must match the job's."""
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if world != cfg.trainer.world_size:
        raise ValueError(f"trainer.world_size is {cfg.trainer.world_size} but torchrun started {world} ranks: "
                         f"pass trainer.world_size={world} (or --nproc-per-node {cfg.trainer.world_size})")
    from rl.policy import resolve_device

    device = resolve_device(cfg.trainer.device, local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=cfg.trainer.collective_timeout_s))
    return rank, world, local


class TorchrunPolicyGroup(PolicyGroup):
    """Rank 0's side: its own worker plus a broadcast of every call to the ranks in `serve_policy_rank`."""

    def __init__(self, cfg, rank: int, world: int, local: int):
        from rl.policy import PolicyWorker

        self.world_size = world
        self.worker = PolicyWorker(cfg, rank=rank, world_size=world, local_rank=local)
        self.device = self.worker.device

    def _send(self, method: str, args: tuple) -> None:
        dist.broadcast_object_list([(method, args)], src=0)

    def _run(self, method: str, *args: Any) -> list[Any]:
        self._send(method, args)
        result = _guarded(self.worker, method, args)
        results: list[Any] = [None] * self.world_size
        dist.all_gather_object(results, result)
        return results

    def _stream(self, method: str, *args: Any) -> Iterator[Any]:
        self._send("__stream__", (method, *args))
        try:
            yield from getattr(self.worker, method)(*args)
        except Exception as err:
            raise _rank_error(0, method, err) from err

    def close(self) -> None:
        try:
            self._send(_STOP, ())
            _leave_group()
        except (RuntimeError, dist.DistBackendError) as err:  # after a rank failed: the job ends with that error
            print(f"policy ranks: could not close the group cleanly ({type(err).__name__}: {err})", file=sys.stderr)


def _leave_group() -> None:
    """Every rank waits for the others, then closes the group: a rank that exits with live gloo/NCCL
    connections can abort its process on the way out (seen: SIGABRT at exit, after a run that had finished)."""
    dist.barrier()
    dist.destroy_process_group()


def serve_policy_rank(cfg, rank: int, world: int, local: int) -> None:
    """A torchrun rank > 0: build the worker, then run what rank 0 broadcasts until it says stop."""
    from rl.policy import PolicyWorker

    worker = PolicyWorker(cfg, rank=rank, world_size=world, local_rank=local)
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        method, args = box[0]
        if method == _STOP:
            _leave_group()
            return
        if method == "__stream__":
            try:
                worker.drain(*args)
            except Exception as err:
                raise _rank_error(rank, args[0], err) from err
            continue
        result = _guarded(worker, method, args)
        dist.all_gather_object([None] * world, result)


def _guarded(worker, method: str, args: tuple) -> Any:
    try:
        return getattr(worker, method)(*args)
    except Exception as err:
        error = _rank_error(worker.rank, method, err)
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise error from err


def _rank_error(rank: int, method: str, err: BaseException) -> RankError:
    return RankError(f"policy rank {rank} ({socket.gethostname()}, pid {os.getpid()}) failed while {method}: "
                     f"{type(err).__name__}: {err}")


# ---------------------------------------------------------------------- Ray


class RayPolicyGroup(PolicyGroup):
    """`world_size` Ray actors in the placement plan's trainer bundles; rank 0's address is the group's rendezvous."""

    def __init__(self, cfg, bundles: list[tuple[Any, int]] | None, gpus_per_rank: float):
        import ray

        from rollout.actors import driver_identity, ensure_ray, host_actor

        ensure_ray(cfg.rollout.ray_address)
        actor_class = host_actor()
        self.world_size = world = cfg.trainer.world_size
        self.actors = []
        for rank in range(world):
            options: dict[str, Any] = {"num_cpus": 0, "num_gpus": gpus_per_rank, "max_concurrency": 2}
            if bundles is not None:
                from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

                group, index = bundles[rank]
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index)
            self.actors.append(actor_class.options(**options).remote(
                "rl.worker_group:RayPolicyRank", {}, cfg.trainer.threads, driver_identity()))
        address = ray.get(self.actors[0].call.remote("address"))
        self._gather([a.call.remote("start", cfg, rank, world, address) for rank, a in enumerate(self.actors)], "starting")
        self.device = torch.device("cpu")  # the driver holds no model

    def _gather(self, futures: list[Any], doing: str) -> list[Any]:
        import ray

        try:
            return ray.get(futures)
        except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as err:
            cause = getattr(err, "cause", None) or err
            self.close()  # the others would wait in a collective for the failed rank
            raise RankError(f"policy ranks, while {doing}: {type(cause).__name__}: {cause}") from err

    def _run(self, method: str, *args: Any) -> list[Any]:
        import ray

        refs = [ray.put(a) for a in args]
        return self._gather([a.call.remote("run", method, *refs) for a in self.actors], method)

    def _stream(self, method: str, *args: Any) -> Iterator[Any]:
        """Rank 0 yields item by item through the driver while the other ranks gather alongside it."""
        others = [a.call.remote("drain", method, *args) for a in self.actors[1:]]
        self._gather([self.actors[0].call.remote("start_stream", method, *args)], method)
        while (item := self._gather([self.actors[0].call.remote("next_item")], method)[0]) is not None:
            yield item
        self._gather(others, method)

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []


class RayPolicyRank:
    """What one Ray policy actor hosts: a `PolicyWorker` joined to the group at `start`."""

    def __init__(self):
        self.worker = None
        self._items: Iterator[Any] | None = None

    def address(self) -> str:
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"tcp://{ray.util.get_node_ip_address()}:{port}"

    def start(self, cfg, rank: int, world: int, address: str) -> dict[str, Any]:
        from rl.policy import PolicyWorker, resolve_device

        device = resolve_device(cfg.trainer.device, 0)  # Ray gives each actor its own GPU(s) as device 0
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=address, rank=rank,
                                world_size=world, timeout=timedelta(seconds=cfg.trainer.collective_timeout_s))
        self.worker = PolicyWorker(cfg, rank=rank, world_size=world, local_rank=0)
        return self.worker.describe()

    def run(self, method: str, *args: Any) -> Any:
        try:
            return getattr(self.worker, method)(*args)
        except Exception as err:
            raise _rank_error(self.worker.rank, method, err) from err

    def drain(self, method: str, *args: Any) -> None:
        self.run("drain", method, *args)

    def start_stream(self, method: str, *args: Any) -> None:
        self._items = getattr(self.worker, method)(*args)

    def next_item(self) -> Any:
        try:
            return next(self._items)
        except StopIteration:
            self._items = None
            return None
