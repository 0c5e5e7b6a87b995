"""Triton DSA kernels against the float64 PyTorch reference (CUDA only; skipped elsewhere)."""

from __future__ import annotations

import math

import pytest
import torch

import models.dsa as dsa
from models.dsa.reference import allowed_mask, sparse_attention_ref

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("lq,lk,topk", [(64, 64, 16), (300, 1300, 256), (2500, 2500, 2048)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["stream", "stream-atomic", "chunked"])
def test_indexer_topk_selects_the_best_scores(lq, lk, topk, dtype, method, monkeypatch):
    import models.dsa.kernels.triton_indexer as ti
    from models.dsa.kernels.triton_indexer import indexer_topk

    if method == "stream-atomic":  # the per-score atomic append instead of the default register-counter loop
        monkeypatch.setattr(ti, "SELECT_APPEND", "atomic")
        method = "stream"

    g = torch.Generator(device="cuda").manual_seed(lq * 7 + lk)
    qi = torch.randn(1, lq, 4, 64, device="cuda", generator=g).to(dtype)
    ki = torch.randn(1, lk, 64, device="cuda", generator=g).to(dtype)
    wi = torch.randn(1, lq, 4, device="cuda", generator=g)
    idx = indexer_topk(qi, ki, wi, topk, method=method, max_chunk_elems=lk * 128).long()
    s = dsa.indexer_scores_ref(qi.double(), ki.double(), wi.double())[0]
    allowed = allowed_mask(None, 1, lq, lk, s.device)[0]
    kk = min(topk, lk)
    best = s.masked_fill(~allowed, -math.inf).topk(kk, -1).values
    valid = idx[0] >= 0
    assert torch.equal(valid.sum(-1), allowed.sum(-1).clamp(max=kk))
    assert torch.gather(allowed, 1, idx[0].clamp(min=0))[valid].all()
    got = torch.gather(s, 1, idx[0].clamp(min=0)).masked_fill(~valid, 0).sum(-1)
    want = best.masked_fill(best == -math.inf, 0)
    tol = 1e-6 if (dtype == torch.float32 or method == "stream") else 2e-3  # chunked bf16 ranks bf16 scores
    assert ((got - want.sum(-1)).abs() / want.abs().sum(-1).clamp_min(1e-9)).max() < tol


@pytest.mark.parametrize("lq,lk,topk", [(128, 128, 32), (3, 700, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_attention_forward_backward(lq, lk, topk, dtype):
    from models.dsa.kernels.triton_indexer import indexer_topk
    from models.dsa.kernels.triton_sparse_attention import sparse_attention

    g = torch.Generator(device="cuda").manual_seed(lq + lk)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g).to(dtype)  # noqa: E731
    q, k, v = r(1, 32, lq, 128), r(1, 4, lk, 128), r(1, 4, lk, 128)
    idx = indexer_topk(r(1, lq, 4, 64), r(1, lk, 64), torch.randn(1, lq, 4, device="cuda", generator=g), topk)
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    out = sparse_attention(qr, kr, vr, idx, 0.088, causal_offset=lk - lq)
    go = torch.randn_like(out)
    out.backward(go)
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    ref = sparse_attention_ref(q64, k64, v64, idx.long(), 0.088)
    ref.backward(go.double())
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for a, b in ((out, ref), (qr.grad, q64.grad), (kr.grad, k64.grad), (vr.grad, v64.grad)):
        assert _rel(a, b) < tol


@pytest.mark.parametrize("key_range", [0, 128, 1000])
def test_sparse_backward_key_range_passes_match_reference(key_range):
    """The backward split into passes over key ranges (sorted index rows, dQ summed over passes) gives the
    reference gradients; 128 keys per pass means 11 passes here, with many segments shorter than a block."""
    from models.dsa.kernels.triton_indexer import indexer_topk
    from models.dsa.kernels.triton_sparse_attention import (key_range_segments, sparse_attention_bwd,
                                                             sparse_attention_fwd)

    g = torch.Generator(device="cuda").manual_seed(key_range + 5)
    lq, lk, topk = 300, 1300, 256
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    q, k, v = r(1, lq, 32, 128), r(1, lk, 4, 128), r(1, lk, 4, 128)
    idx = indexer_topk(r(1, lq, 4, 64), r(1, lk, 64), r(1, lq, 4), topk)
    rows, seg, n_pass = key_range_segments(idx, lk, key_range, lk - lq)
    assert n_pass == (1 if key_range == 0 else -(-lk // key_range))
    if n_pass > 1:  # every valid slot in exactly one segment, each segment inside its key range
        assert torch.equal(seg[..., -1], (idx >= 0).sum(-1).int())
        for p in range(n_pass):
            slot = torch.arange(topk, device="cuda")
            inside = (slot >= seg[..., p:p + 1]) & (slot < seg[..., p + 1:p + 2])
            assert ((rows[inside] >= p * key_range) & (rows[inside] < (p + 1) * key_range)).all()
    out, lse = sparse_attention_fwd(q, k, v, idx, 0.088, lk - lq)
    go = torch.randn_like(out)
    dq, dk, dv = sparse_attention_bwd(q, k, v, idx, out, lse, go, 0.088, lk - lq, {"key_range": key_range})
    q64, k64, v64 = (x.double().transpose(1, 2).requires_grad_() for x in (q, k, v))
    ref = sparse_attention_ref(q64, k64, v64, idx.long(), 0.088)
    ref.backward(go.double())
    for a, b in ((dq, q64.grad.transpose(1, 2)), (dk, k64.grad.transpose(1, 2)), (dv, v64.grad.transpose(1, 2))):
        assert _rel(a, b) < 1e-4


def test_model_kernel_path_equals_dense_when_k_covers_length():
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        dsa.tiny_text_config("qwen3_moe", num_attention_heads=8, num_key_value_heads=2, head_dim=16)).cuda().eval()
    ids = torch.randint(0, 100, (1, 40), device="cuda")
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        dsa.attach_dsa(model, topk=64, index_heads=2, index_head_dim=16, dense_when_short=False,
                       use_kernels="always")
        out = model(input_ids=ids).logits
        gen_dense_free = model.generate(input_ids=ids[:, :8], max_new_tokens=6, do_sample=False)
        dsa.set_dsa_mode(model, "dense")
        gen_dense = model.generate(input_ids=ids[:, :8], max_new_tokens=6, do_sample=False)
    assert torch.allclose(out, ref, atol=2e-4, rtol=1e-3)
    assert torch.equal(gen_dense_free, gen_dense)
