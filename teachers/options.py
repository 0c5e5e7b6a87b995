"""Typed `teachers[].engine_args` sections, one per teacher backend: what each backend's constructor accepts
besides the keys the trainer fills from the teacher's own entry (name, path, view, topk, batch_size,
template_kwargs). Validated by the config loader against the teacher's `backend`, defaults filled in.

Kept apart from the backends so that a config naming vLLM validates where vLLM is not installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from core.options import option
from models.attention import AttentionChoice


@dataclass
class HFTeacherOptions:
    """A transformers-served teacher (`teachers[].backend: hf`)."""

    dtype: Literal["float32", "bfloat16", "float16"] = option(
        "Precision the teacher is served in (bfloat16: half the bytes per forward).", default="float32")
    device: str = option("torch device of the teacher model.", default="cpu")
    packing: Literal["shared_prompt", "none"] = option(
        "'shared_prompt': the G responses of a sample are scored over one forward of its prompt (in the teacher's "
        "own view), in padding-free batches of batch_tokens; the same log-probs as 'none' (every response with "
        "its own padded prompt copy, batch_size rows per forward).", default="shared_prompt")
    batch_tokens: int = option(
        "shared_prompt: tokens per packed forward (each prompt once plus its responses; a sample's responses stay "
        "together, a group over the budget gets a forward of its own); batch_size still caps its rows.",
        default=16384, ge=1)
    attention: AttentionChoice = option(
        "Attention implementation. 'auto': sdpa_flex for shared_prompt packing on a CUDA device (flex_attention's "
        "block-sparse mask for a row of several responses instead of a dense [L, L] one, sdpa's causal kernel for "
        "a row of one sequence), else the model's own (sdpa).", default="auto")


@dataclass
class VLLMTeacherOptions:
    """A vLLM-served teacher (`teachers[].backend: vllm`; docs/vllm.md)."""

    tensor_parallel_size: int = option("GPUs per teacher engine (give the actor as many: gpus_per_worker).",
                                       default=1, ge=1)
    gpu_memory_utilization: float | None = option("Share of device memory for weights + KV cache.", default=None,
                                                  gt=0, le=1)
    kv_cache_memory_bytes: int | None = option("KV cache size in bytes; overrides the utilisation.", default=None,
                                               gt=0)
    max_model_len: int | None = option("Context limit (null: the model config's).", default=None, ge=1)
    dtype: str | None = option("Serving precision (null: float32 on CPU, vLLM's 'auto' on GPU).", default=None)
    threads: int = option("torch CPU threads (0: leave as is).", default=0, ge=0)
    llm_kwargs: dict[str, Any] = option("Any other vllm.LLM keyword argument, passed through.", default_factory=dict)
