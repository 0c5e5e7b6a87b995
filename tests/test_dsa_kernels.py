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
@pytest.mark.parametrize("method", ["stream", "stream-atomic", "stream-blocks", "stream-sorted", "chunked"])
def test_indexer_topk_selects_the_best_scores(lq, lk, topk, dtype, method, monkeypatch):
    import models.dsa.kernels.triton_indexer as ti
    from models.dsa.kernels.triton_indexer import indexer_topk

    if method == "stream-atomic":  # the per-score atomic append instead of the default register-counter loop
        monkeypatch.setattr(ti, "SELECT_APPEND", "atomic")
        method = "stream"
    if method == "stream-blocks":  # candidate lists for 64 rows at a time: many blocks of rows
        monkeypatch.setattr(ti, "SELECT_MEMORY", 64 * 3 * topk * 8)
        method = "stream"
    sort_rows = method == "stream-sorted"  # every row ascending, valid-first
    method = "stream" if sort_rows else method

    g = torch.Generator(device="cuda").manual_seed(lq * 7 + lk)
    qi = torch.randn(1, lq, 4, 64, device="cuda", generator=g).to(dtype)
    ki = torch.randn(1, lk, 64, device="cuda", generator=g).to(dtype)
    wi = torch.randn(1, lq, 4, device="cuda", generator=g)
    idx = indexer_topk(qi, ki, wi, topk, method=method, max_chunk_elems=lk * 128, sort_rows=sort_rows).long()
    if sort_rows:
        key = torch.where(idx >= 0, idx, (1 << 40) + torch.arange(idx.shape[-1], device=idx.device))
        assert (key[..., 1:] > key[..., :-1]).all()
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


@pytest.mark.parametrize("key_range,dq_rows,sort_rows", [(0, 0, False), (128, 100, False), (128, 100, True),
                                                         (1000, 0, False)])
def test_sparse_backward_key_range_passes_match_reference(key_range, dq_rows, sort_rows):
    """The backward split into passes over key ranges (sorted index rows, dQ summed over passes) gives the
    reference gradients; 128 keys per pass means 11 passes here, with many segments shorter than a block, and
    dQ summed for 100 rows at a time (the causal offset puts early passes' first rows in later row blocks).
    Rows the selection wrote sorted (`sort_rows`) are read in place, not copied."""
    from models.dsa.kernels.triton_indexer import indexer_topk
    from models.dsa.kernels.triton_sparse_attention import (key_range_segments, sparse_attention_bwd,
                                                             sparse_attention_fwd)

    g = torch.Generator(device="cuda").manual_seed(key_range + 5)
    lq, lk, topk = 300, 1300, 256
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    q, k, v = r(1, lq, 32, 128), r(1, lk, 4, 128), r(1, lk, 4, 128)
    idx = indexer_topk(r(1, lq, 4, 64), r(1, lk, 64), r(1, lq, 4), topk, sort_rows=sort_rows)
    rows, seg, n_pass = key_range_segments(idx, lk, key_range, lk - lq, sorted_rows=sort_rows)
    assert (rows.data_ptr() == idx.data_ptr()) == (sort_rows or n_pass == 1)
    assert n_pass == (1 if key_range == 0 else -(-lk // key_range))
    if n_pass > 1:  # every valid slot in exactly one segment, each segment inside its key range
        assert torch.equal(seg[..., -1], (idx >= 0).sum(-1).int())
        for p in range(n_pass):
            slot = torch.arange(topk, device="cuda")
            inside = (slot >= seg[..., p:p + 1]) & (slot < seg[..., p + 1:p + 2])
            assert ((rows[inside] >= p * key_range) & (rows[inside] < (p + 1) * key_range)).all()
    out, lse = sparse_attention_fwd(q, k, v, idx, 0.088, lk - lq)
    go = torch.randn_like(out)
    dq, dk, dv = sparse_attention_bwd(q, k, v, idx, out, lse, go, 0.088, lk - lq,
                                      {"key_range": key_range, "dq_rows": dq_rows}, sorted_rows=sort_rows)
    q64, k64, v64 = (x.double().transpose(1, 2).requires_grad_() for x in (q, k, v))
    ref = sparse_attention_ref(q64, k64, v64, idx.long(), 0.088)
    ref.backward(go.double())
    for a, b in ((dq, q64.grad.transpose(1, 2)), (dk, k64.grad.transpose(1, 2)), (dv, v64.grad.transpose(1, 2))):
        assert _rel(a, b) < 1e-4


def _tiny_moe_on_cuda():
    """A seeded tiny Qwen3-MoE (8 query / 2 KV heads of 16) on CUDA in eval mode, before DSA is attached."""
    import transformers

    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(
        dsa.tiny_text_config("qwen3_moe", num_attention_heads=8, num_key_value_heads=2, head_dim=16)).cuda().eval()


def test_model_kernel_path_equals_dense_when_k_covers_length():
    model = _tiny_moe_on_cuda()
    ids = torch.randint(0, 100, (1, 40), device="cuda")
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        dsa.attach_dsa(model, topk=64, index_heads=2, index_head_dim=16, dense_when_short=False,
                       use_kernels="always", dense_below=0)
        out = model(input_ids=ids).logits
        gen_dense_free = model.generate(input_ids=ids[:, :8], max_new_tokens=6, do_sample=False)
        dsa.set_dsa_mode(model, "dense")
        gen_dense = model.generate(input_ids=ids[:, :8], max_new_tokens=6, do_sample=False)
    assert torch.allclose(out, ref, atol=2e-4, rtol=1e-3)
    assert torch.equal(gen_dense_free, gen_dense)


@pytest.mark.parametrize("pattern", ["structured", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_m,key_range,dq_rows", [(16, 0, 0), (8, 1024, 1000)])
def test_tile_shared_keys_give_the_reference_result(pattern, dtype, block_m, key_range, dq_rows, monkeypatch):
    """Keys shared by a tile of queries through the tile kernel, the rest per query: output and gradients equal
    the float64 reference (and so the per-query path), for both selection patterns, one and several key passes
    (the fp32 dQ of every row at once, or of 1,000 rows at a time)."""
    import models.dsa.kernels.triton_sparse_attention as sa
    from models.dsa.patterns import random_selection, structured_selection

    monkeypatch.setitem(sa.BWD_CONFIG, "key_range", key_range)
    monkeypatch.setitem(sa.BWD_CONFIG, "dq_rows", dq_rows)
    lq, topk = 3000, 256
    if pattern == "structured":
        idx = structured_selection(lq, topk, window=64, salient_blocks=4, block=16, segment=1024, n_random=128,
                                   device="cuda")
    else:
        idx = random_selection(lq, topk, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(block_m)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g).to(dtype)  # noqa: E731
    q, k, v = r(1, 32, lq, 128), r(1, 4, lq, 128), r(1, 4, lq, 128)
    split = sa.plan_split(idx, {"mode": "on", "block_m": block_m})
    assert split.shared_fraction > (0.5 if pattern == "structured" else 0.0)
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    out = sa.sparse_attention(qr, kr, vr, idx, causal_offset=0, share={"mode": "on", "block_m": block_m})
    gout = torch.randn(out.shape, device="cuda", generator=g).to(dtype)
    out.backward(gout)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = sparse_attention_ref(q64, k64, v64, idx.long(), 1 / math.sqrt(128))
    ref.backward(gout.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for got, want in ((out, ref), (qr.grad, q64.grad), (kr.grad, k64.grad), (vr.grad, v64.grad)):
        assert _rel(got, want) < tol


@pytest.mark.parametrize("n_keys,topk", [(700, 64), (5000, 2048), (40, 64)])
@pytest.mark.parametrize("select,segments", [("torch", 1), ("torch", 8), ("radix", 1)])
def test_decode_step_selects_and_attends_like_the_reference(n_keys, topk, select, segments, monkeypatch):
    """One decode step: the exact top-k (ties, e.g. repeated keys and ReLU zeros, to the earlier key as in the
    reference; torch.topk of the row in one piece or in 8, or the radix select), and sparse attention over it,
    split into slices and merged, equal to the float64 reference."""
    import models.dsa.kernels.triton_decode as td
    from models.dsa.indexer import topk_indices_ref
    from models.dsa.kernels.triton_decode import decode_attention, decode_select

    monkeypatch.setitem(td.DECODE_CONFIG, "segments", segments)
    monkeypatch.setitem(td.DECODE_CONFIG, "select", select)

    g = torch.Generator(device="cuda").manual_seed(n_keys)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    b = 3
    qi, ki, wi = r(b, 1, 4, 64), r(b, n_keys, 64), r(b, 1, 4)
    ki[:, 10:30] = ki[:, 5:6]  # tied scores
    wi[1] = -wi[1].abs()  # one sequence of all-negative weights: exact zeros tie everywhere
    ki[2, n_keys // 3:] = ki[2, 7]  # most keys equal
    idx = decode_select(qi, ki, wi, topk)
    allowed = allowed_mask(None, b, 1, n_keys, qi.device)
    ref_idx = topk_indices_ref(dsa.indexer_scores_ref(qi, ki, wi), allowed, topk)
    for i in range(b):
        assert set(idx[i, 0].tolist()) == set(ref_idx[i, 0][ref_idx[i, 0] >= 0].tolist())
    q, k, v = r(b, 32, 1, 128), r(b, 4, n_keys, 128), r(b, 4, n_keys, 128)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        out = decode_attention(q.to(dtype), k.to(dtype), v.to(dtype), idx, 1 / math.sqrt(128))
        ref = sparse_attention_ref(q.double(), k.double(), v.double(), idx.long(), 1 / math.sqrt(128))
        assert _rel(out, ref) < tol


@pytest.mark.parametrize("dense_below", [0, 36])
def test_generation_with_cached_decode_kernel_equals_full_forwards(dense_below):
    """generate() with the KV cache (each new token through the decode kernel) gives the tokens of generate()
    without a cache (each step a full forward through the prefill kernels), with k smaller than the context;
    with dense_below inside the generated span, the dense/top-k boundary moves through the decode steps."""
    model = _tiny_moe_on_cuda()
    ids = torch.randint(0, 100, (1, 30), device="cuda")
    with torch.no_grad():
        dense_logits = model(input_ids=ids).logits
        dsa.attach_dsa(model, topk=8, index_heads=2, index_head_dim=16, use_kernels="always",
                       dense_below=dense_below)
        sparse_logits = model(input_ids=ids).logits
        cached = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False, use_cache=True)
        full = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(cached, full)
    # every position of the prompt is below 36: dense; with 0 the top-k of 8 changes the logits
    assert torch.allclose(sparse_logits, dense_logits, atol=2e-4, rtol=1e-3) == (dense_below == 36)


def test_fp8_indexer_selects_the_top_k_of_the_quantised_scores():
    """float8 e4m3 index queries/keys with per-token scales: the selection is the exact top-k of the dequantised
    scores, and mostly the bf16 selection (random inputs, the hard case for agreement)."""
    from models.dsa.kernels.triton_indexer import indexer_topk, quantize_fp8

    g = torch.Generator(device="cuda").manual_seed(5)
    lq, topk = 3000, 256
    qi = torch.randn(1, lq, 4, 64, device="cuda", generator=g).bfloat16()
    ki = torch.randn(1, lq, 64, device="cuda", generator=g).bfloat16()
    wi = torch.randn(1, lq, 4, device="cuda", generator=g)
    idx8 = indexer_topk(qi, ki, wi, topk, fp8=True).long()
    q8, k8, w8, sk = quantize_fp8(qi, ki, wi)
    s = dsa.indexer_scores_ref(q8.double(), k8.double(), w8.double())[0] * sk[0].double()[None, :]
    allowed = allowed_mask(None, 1, lq, lq, s.device)[0]
    best = s.masked_fill(~allowed, -math.inf).topk(topk, -1).values
    got = torch.gather(s, 1, idx8[0].clamp(min=0)).masked_fill(idx8[0] < 0, 0).sum(-1)
    want = best.masked_fill(best == -math.inf, 0)
    assert ((got - want.sum(-1)).abs() / want.abs().sum(-1).clamp_min(1e-9)).max() < 1e-5
    idx16 = indexer_topk(qi, ki, wi, topk, fp8=False).long()
    same = [len(set(idx8[0, t].tolist()) & set(idx16[0, t].tolist())) / topk for t in range(topk, lq, 97)]
    assert sum(same) / len(same) > 0.8
