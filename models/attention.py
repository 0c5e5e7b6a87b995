"""`sdpa_flex`: one attention implementation that sends each call to the kernel its mask wants.

- a FlexAttention `BlockMask` (a shared-prompt packed row: responses that may not see each other) goes to
  transformers' `flex_attention`, which skips the masked blocks;
- no mask (a row that is one causal sequence) goes to transformers' `sdpa` with `is_causal`: cuDNN's fused kernel
  on Hopper. Measured on one H100 at 32K tokens, 32 query / 4 K/V heads of 128 (`bench/bench_attention.py`, and the
  FlexAttention rows of `bench/bench_train_step.py --profile`): cuDNN causal 14 ms forward, 55 ms forward+backward
  (~560 TFLOP/s); FlexAttention with a causal BlockMask 22 ms and 95 ms; sdpa given the same causal mask as a dense
  `[L, L]` tensor 52 ms and 216 ms (it computes every block and reads the mask);
- a dense tensor mask (padding, cache offsets, DSA's reference path) goes to `sdpa` unchanged;
- where FlexAttention does not compile for a shape (seen for head dim 32 on an H100), the BlockMask becomes a dense
  mask for sdpa, with one warning: slower, same values.

Registered under its own name in transformers' attention and mask interfaces; 2-D padding masks become sdpa masks.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:  # the config modules import the choices below without importing torch
    import torch

SDPA_FLEX = "sdpa_flex"

# What `model.attention` and the HF teachers' `engine_args.attention` accept ('auto': see
# `models.packing.resolve_attention`); the rest are transformers' implementation names.
AttentionChoice = Literal["auto", "sdpa", "sdpa_flex", "flex_attention", "eager"]
ATTENTION_CHOICES: tuple[str, ...] = get_args(AttentionChoice)


# (device type, dtype, query heads, kv heads, head dim) whose FlexAttention compile failed. Seen on an H100 with
# torch 2.11: a bf16 model of head dim 32, 2 query / 1 KV heads, 82 tokens ("NoValidChoicesError" in the
# flex_attention lowering); head dim 128 compiles there. Remembered so that the compile is not retried every call.
_FLEX_FAILED: set[tuple] = set()


def sdpa_flex_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """query `[B, Hq, L, D]`, key/value `[B, Hkv, S, D]`, attention_mask a `BlockMask`, a `[B, 1, L, S]` tensor or
    None -> (`[B, L, Hq, D]`, weights or None), as transformers' attention functions return."""
    import torch
    from torch.nn.attention.flex_attention import BlockMask
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if isinstance(attention_mask, BlockMask):
        signature = (query.device.type, query.dtype, query.shape[1], key.shape[1], query.shape[-1])
        if signature not in _FLEX_FAILED:
            from transformers.integrations.flex_attention import flex_attention_forward

            try:
                return flex_attention_forward(module, query, key, value, attention_mask, **kwargs)
            except torch.OutOfMemoryError:
                raise
            except Exception as err:  # noqa: BLE001  (the compiler found no kernel for this shape)
                _FLEX_FAILED.add(signature)
                warnings.warn(f"sdpa_flex: FlexAttention failed for (device, dtype, query heads, kv heads, head "
                              f"dim) {signature}; sdpa with a dense mask from now on for it: {err!r:.600}",
                              stacklevel=2)
        attention_mask = dense_mask(attention_mask)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def dense_mask(block_mask) -> torch.Tensor:
    """A FlexAttention `BlockMask` as sdpa's `[1, 1, Q, KV]` bool mask (True: may attend), from its mask_mod."""
    from torch.nn.attention.flex_attention import create_mask

    q_len, kv_len = block_mask.seq_lengths
    return create_mask(block_mask.mask_mod, 1, 1, q_len, kv_len, device=block_mask.kv_indices.device)


def register() -> None:
    """Make `sdpa_flex` a transformers attention implementation (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(SDPA_FLEX, sdpa_flex_attention)
    AttentionMaskInterface.register(SDPA_FLEX, sdpa_mask)
