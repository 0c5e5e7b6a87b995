"""Typed `rollout.engine_args` sections, one per engine: what each backend's constructor accepts besides the
`model_path` and `batch_size` the trainer passes. The config loader validates `engine_args` against the section of
the chosen `rollout.backend` (unknown key -> error naming the closest valid key) and fills in these defaults;
`tests/test_engine_options.py` holds each section equal to its engine's constructor keywords.

Kept apart from the engines so that a config naming vLLM validates where vLLM is not installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from core.options import option

InferenceDtype = Literal["float32", "bfloat16", "float16"]


@dataclass
class HFEngineOptions:
    """transformers `generate` (`rollout.backend: hf`)."""

    dtype: InferenceDtype = option(
        "Precision of the engine's copy of the weights (bfloat16 serves rollouts at half the bytes while the "
        "trainer keeps float32; the mismatch correction handles the gap).", default="float32")
    device: str = option("torch device of the engine's model.", default="cpu")
    threads: int = option("torch CPU threads of the engine's process (0: leave as is).", default=0, ge=0)


@dataclass
class VLLMEngineOptions:
    """vLLM (`rollout.backend: vllm`; docs/vllm.md)."""

    tensor_parallel_size: int = option("GPUs per engine (give the actor as many: rollout.gpus_per_worker).",
                                       default=1, ge=1)
    gpu_memory_utilization: float | None = option(
        "Share of device memory for weights + KV cache (on CPU: of RAM; null: 0.5 on CPU, vLLM's on GPU).",
        default=None, gt=0, le=1)
    kv_cache_memory_bytes: int | None = option("KV cache size in bytes; overrides the utilisation.", default=None,
                                               gt=0)
    max_model_len: int | None = option("Context limit (null: the model config's).", default=None, ge=1)
    dtype: str | None = option("Serving precision (null: float32 on CPU, vLLM's 'auto' on GPU).", default=None)
    sync: Literal["iterator", "folder", "ipc"] | None = option(
        "Weight-sync method after every update (null: iterator on CPU, ipc on GPU).", default=None)
    sync_options: dict[str, Any] = option("Keyword arguments of the sync method, e.g. {folder: /dev/shm/x}.",
                                          default_factory=dict)
    check_sync: bool = option("After each sync compare vLLM's log-probs of a probe with transformers'; raise above "
                              "check_tolerance.", default=False)
    check_tolerance: float = option("Largest abs log-prob difference check_sync accepts.", default=1e-3, gt=0)
    sleep_level: Literal[0, 1, 2] = option(
        "1 or 2: sleep between generate calls (weights offloaded / dropped) so the trainer can use the GPU memory; "
        "needs vLLM's sleep mode (CUDA).", default=0)
    stop: list[str] | None = option("Stop strings (responses then end at them, not at end-of-turn).", default=None)
    threads: int = option("torch CPU threads (0: leave as is).", default=0, ge=0)
    llm_kwargs: dict[str, Any] = option("Any other vllm.LLM keyword argument, passed through.", default_factory=dict)


@dataclass
class ReferenceEngineOptions:
    """The tasks' demonstrations (`rollout.backend: reference`): nothing to configure."""
