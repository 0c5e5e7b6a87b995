"""`sdpa_flex` (models/attention.py): each call goes to the kernel its mask wants, with the same values as sdpa."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY
from models.attention import SDPA_FLEX, sdpa_flex_attention
from models.factory import TinyModelSpec, build_model
from models.packing import set_attention


class _Layer(torch.nn.Module):
    """What transformers' attention functions read from the attention module."""

    is_causal, num_key_value_groups, layer_idx = True, 2, 0


def _qkv(length: int = 64):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, length, 16, generator=g)
    return q, torch.randn(1, 2, length, 16, generator=g), torch.randn(1, 2, length, 16, generator=g)


def _sdpa(q, k, v, **kw) -> torch.Tensor:
    """Plain attention over K/V repeated to every query head -> `[B, L, H, D]`."""
    return F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), scale=0.25,
                                          **kw).transpose(1, 2)


def test_a_block_mask_goes_to_flex_attention_and_equals_sdpa_on_the_dense_mask():
    """On the GPU where there is one (FlexAttention compiles for it), else on the CPU."""
    from torch.nn.attention.flex_attention import create_block_mask

    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (t.to(device) for t in _qkv())
    segment = torch.tensor([0] * 40 + [1] * 24, device=device)  # two packed sequences

    def mask_mod(_b, _h, qi, ki):
        return (ki <= qi) & (segment[qi] == segment[ki])

    block = create_block_mask(mask_mod, B=1, H=None, Q_LEN=64, KV_LEN=64, device=device, BLOCK_SIZE=16)
    idx = torch.arange(64, device=device)
    dense = mask_mod(0, 0, idx[:, None], idx[None])[None, None]
    out, _ = sdpa_flex_attention(_Layer(), q, k, v, block, scaling=0.25)
    torch.testing.assert_close(out, _sdpa(q, k, v, attn_mask=dense), rtol=0, atol=1e-4)  # a wrong mask: ~0.1
    # the dense tensor itself goes to sdpa
    out, _ = sdpa_flex_attention(_Layer(), q, k, v, dense, scaling=0.25)
    torch.testing.assert_close(out, _sdpa(q, k, v, attn_mask=dense), rtol=0, atol=1e-6)


def test_no_mask_is_plain_causal_attention():
    q, k, v = _qkv()
    out, _ = sdpa_flex_attention(_Layer(), q, k, v, None, scaling=0.25)
    torch.testing.assert_close(out, _sdpa(q, k, v, is_causal=True), rtol=0, atol=1e-6)


def test_a_model_switched_to_sdpa_flex_computes_what_sdpa_does(project_tokenizer):
    """Registered with sdpa's mask builder: a padded batch and an unpadded one give sdpa's logits."""
    torch.manual_seed(0)
    model = build_model(TinyModelSpec(family="qwen3_moe", **TINY), project_tokenizer, seed=1).eval()
    ids = torch.randint(0, 500, (2, 12))
    padded = torch.ones(2, 12, dtype=torch.long)
    padded[1, :4] = 0  # left padding
    with torch.no_grad():
        want = [model(input_ids=ids, attention_mask=m).logits for m in (padded, torch.ones_like(padded))]
        set_attention(model, SDPA_FLEX)
        assert model.config.get_text_config()._attn_implementation == SDPA_FLEX
        got = [model(input_ids=ids, attention_mask=m).logits for m in (padded, torch.ones_like(padded))]
    for g, w in zip(got, want):
        torch.testing.assert_close(g[padded.bool()], w[padded.bool()], rtol=0, atol=1e-5)


def test_where_flex_attention_fails_the_block_mask_goes_to_sdpa_as_a_dense_mask(monkeypatch):
    """A shape FlexAttention cannot compile gets one warning and sdpa's result on the same mask, then no retry."""
    import transformers.integrations.flex_attention as hf_flex
    from torch.nn.attention.flex_attention import create_block_mask

    import models.attention as attention

    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("NoValidChoicesError: No choices to select")

    monkeypatch.setattr(hf_flex, "flex_attention_forward", failing)
    monkeypatch.setattr(attention, "_FLEX_FAILED", set())
    q, k, v = _qkv(48)
    segment = torch.tensor([0] * 20 + [1] * 28)

    def mask_mod(_b, _h, qi, ki):
        return (ki <= qi) & (segment[qi] == segment[ki])

    block = create_block_mask(mask_mod, B=1, H=None, Q_LEN=48, KV_LEN=48, device="cpu", BLOCK_SIZE=16)
    idx = torch.arange(48)
    dense = mask_mod(0, 0, idx[:, None], idx[None])[None, None]
    assert torch.equal(attention.dense_mask(block), dense)
    with pytest.warns(UserWarning, match="FlexAttention failed"):
        out, _ = sdpa_flex_attention(_Layer(), q, k, v, block, scaling=0.25)
    torch.testing.assert_close(out, _sdpa(q, k, v, attn_mask=dense), rtol=0, atol=1e-6)
    out, _ = sdpa_flex_attention(_Layer(), q, k, v, block, scaling=0.25)  # remembered: no second attempt
    assert len(calls) == 1
