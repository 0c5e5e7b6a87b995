"""`sdpa_flex`: one attention implementation that sends each call to the kernel its mask wants.

- a FlexAttention `BlockMask` (a shared-prompt packed row: responses that may not see each other) goes to
  transformers' `flex_attention`, which skips the masked blocks;
- no mask (a row that is one causal sequence) goes to transformers' `sdpa` with `is_causal`: cuDNN's fused kernel
  on Hopper. Measured on one H100 at 32K tokens, 32 query / 4 K/V heads of 128 (`bench/bench_attention.py`, and the
  FlexAttention rows of `bench/bench_train_step.py --profile`): cuDNN causal 14 ms forward, 55 ms forward+backward
  (~560 TFLOP/s); FlexAttention with a causal BlockMask 22 ms and 95 ms; sdpa given the same causal mask as a dense
  `[L, L]` tensor 52 ms and 216 ms (it computes every block and reads the mask);
- a dense tensor mask (padding, cache offsets, DSA's reference path) goes to `sdpa` unchanged.

Registered under its own name in transformers' attention and mask interfaces; 2-D padding masks become sdpa masks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:  # the config modules import the choices below without importing torch
    import torch

SDPA_FLEX = "sdpa_flex"

# What `model.attention` and the HF teachers' `engine_args.attention` accept ('auto': see
# `models.packing.resolve_attention`); the rest are transformers' implementation names.
AttentionChoice = Literal["auto", "sdpa", "sdpa_flex", "flex_attention", "eager"]
ATTENTION_CHOICES: tuple[str, ...] = get_args(AttentionChoice)


def sdpa_flex_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """query `[B, Hq, L, D]`, key/value `[B, Hkv, S, D]`, attention_mask a `BlockMask`, a `[B, 1, L, S]` tensor or
    None -> (`[B, L, Hq, D]`, weights or None), as transformers' attention functions return."""
    from torch.nn.attention.flex_attention import BlockMask

    if isinstance(attention_mask, BlockMask):
        from transformers.integrations.flex_attention import flex_attention_forward

        return flex_attention_forward(module, query, key, value, attention_mask, **kwargs)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register() -> None:
    """Make `sdpa_flex` a transformers attention implementation (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(SDPA_FLEX, sdpa_flex_attention)
    AttentionMaskInterface.register(SDPA_FLEX, sdpa_mask)
