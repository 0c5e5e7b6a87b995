"""Activation checkpointing of the decoder layers: full recomputation, or recomputation that keeps the attention.

Full checkpointing (`on`) runs each decoder layer's forward twice: once in the forward pass, once in the backward
to rebuild what the layer's backward needs. At 32K tokens of the 30B-A3B layer shape the repeated cuDNN attention
forward is 13 ms of each layer's ~190 ms of update (`bench/README.md`, the training step's profile). `selective`
keeps the attention kernels' outputs (`[B, heads, T, head_dim]` and the per-row logsumexp: 256 MiB a layer at 32K
x 32 heads of 128 in bf16) and recomputes everything else, as torchtitan's op-level selective checkpointing does.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

_ATTENTION_OPS = {
    getattr(torch.ops.aten, name).default
    for name in ("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu")
    if hasattr(torch.ops.aten, name)
}


def _keep_attention(_ctx, op, *_args, **_kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def checkpointing_mode(setting: str, device: torch.device) -> str:
    """`trainer.activation_checkpointing` resolved: 'auto' is 'on' for CUDA and 'off' elsewhere."""
    if setting == "auto":
        return "on" if device.type == "cuda" else "off"
    return setting


def enable_checkpointing(model, mode: str) -> None:
    """Turn on checkpointing of `model`'s decoder layers (a transformers model) in `mode` ('on', 'selective');
    'off' leaves the model as it is."""
    if mode == "off":
        return
    if mode not in ("on", "selective"):
        raise ValueError(f"activation checkpointing {mode!r} is not one of on, selective, off")
    kwargs = {"use_reentrant": False}
    if mode == "selective":
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _keep_attention)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
