"""Sparse GQA attention over selected key indices: Triton forward and backward, bf16 I/O, fp32 accumulation.

One program per (query token, KV head, batch): it gathers the selected K/V rows once and uses them for all the
query heads of that GQA group (8 for Qwen3-30B-A3B), so each gathered row feeds 8 heads. The softmax is the
streaming (online) one; the forward saves the log-sum-exp (base 2) for the backward, which recomputes the
probabilities, writes dQ directly and adds dK/dV into fp32 buffers with atomics (rows selected by many queries).
Index rows are "valid-first" when `causal_offset` is given: slots past min(K, t + causal_offset + 1) are skipped.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# launch settings (block of gathered keys, warps, pipeline depth); chosen from the sweep in bench/bench_dsa.py
# under the constraint of no register spills (checked with cuobjdump -res-usage on sm_90 builds)
FWD_CONFIG = {"block_k": 64, "num_warps": 4, "num_stages": 2}
BWD_CONFIG = {"block_k": 32, "num_warps": 4, "num_stages": 1}


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """tl.dot, in true fp32 for fp32 inputs (the float32 checks), tensor-core bf16/tf32 otherwise."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _sparse_fwd_kernel(Q, K, V, IDX, Out, LSE, qk_scale,
                       sq_b, sq_l, sq_h, sk_b, sk_l, sk_h, sv_b, sv_l, sv_h,
                       si_b, si_l, so_b, so_l, so_h, sl_b, sl_l,
                       KK, causal_offset,
                       G: tl.constexpr, BH: tl.constexpr, D: tl.constexpr, BK: tl.constexpr,
                       IEEE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_h = tl.arange(0, BH)
    offs_d = tl.arange(0, D)
    hmask = offs_h < G
    heads = g * G + offs_h
    q = tl.load(Q + b * sq_b + t * sq_l + heads[:, None] * sq_h + offs_d[None, :], mask=hmask[:, None], other=0.0)
    m_i = tl.full((BH,), float("-inf"), tl.float32)
    l_i = tl.zeros((BH,), tl.float32)
    acc = tl.zeros((BH, D), tl.float32)
    n = tl.where(causal_offset >= 0, tl.minimum(KK, tl.program_id(0) + causal_offset + 1), KK)
    idx_row = IDX + b * si_b + t * si_l
    kbase = K + b * sk_b + g * sk_h
    vbase = V + b * sv_b + g * sv_h
    for start in range(0, n, BK):
        offs_k = start + tl.arange(0, BK)
        ids = tl.load(idx_row + offs_k, mask=offs_k < n, other=-1)
        valid = ids >= 0
        ids64 = tl.where(valid, ids, 0).to(tl.int64)
        kt = tl.load(kbase + ids64[:, None] * sk_l + offs_d[None, :], mask=valid[:, None], other=0.0)
        s = _dot(q, tl.trans(kt), IEEE) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(vbase + ids64[:, None] * sv_l + offs_d[None, :], mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(vt.dtype), vt, IEEE)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(Out + b * so_b + t * so_l + heads[:, None] * so_h + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=hmask[:, None])
    lse = tl.where(l_i > 0, m_i + tl.math.log2(l_safe), float("inf"))
    tl.store(LSE + b * sl_b + t * sl_l + heads, lse, mask=hmask)


@triton.jit
def _sparse_bwd_kernel(Q, K, V, IDX, DO, LSE, DELTA, DQ, DK, DV, qk_scale, sm_scale,
                       sq_b, sq_l, sq_h, sk_b, sk_l, sk_h, sv_b, sv_l, sv_h,
                       si_b, si_l, sdo_b, sdo_l, sdo_h, sl_b, sl_l,
                       sdq_b, sdq_l, sdq_h, sdk_b, sdk_l, sdk_h,
                       KK, causal_offset,
                       G: tl.constexpr, BH: tl.constexpr, D: tl.constexpr, BK: tl.constexpr,
                       IEEE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_h = tl.arange(0, BH)
    offs_d = tl.arange(0, D)
    hmask = offs_h < G
    heads = g * G + offs_h
    q = tl.load(Q + b * sq_b + t * sq_l + heads[:, None] * sq_h + offs_d[None, :], mask=hmask[:, None], other=0.0)
    do = tl.load(DO + b * sdo_b + t * sdo_l + heads[:, None] * sdo_h + offs_d[None, :], mask=hmask[:, None],
                 other=0.0)
    lse = tl.load(LSE + b * sl_b + t * sl_l + heads, mask=hmask, other=float("inf"))
    delta = tl.load(DELTA + b * sl_b + t * sl_l + heads, mask=hmask, other=0.0)
    dq = tl.zeros((BH, D), tl.float32)
    n = tl.where(causal_offset >= 0, tl.minimum(KK, tl.program_id(0) + causal_offset + 1), KK)
    idx_row = IDX + b * si_b + t * si_l
    kbase = K + b * sk_b + g * sk_h
    vbase = V + b * sv_b + g * sv_h
    dkbase = DK + b * sdk_b + g * sdk_h
    dvbase = DV + b * sdk_b + g * sdk_h
    for start in range(0, n, BK):
        offs_k = start + tl.arange(0, BK)
        ids = tl.load(idx_row + offs_k, mask=offs_k < n, other=-1)
        valid = ids >= 0
        ids64 = tl.where(valid, ids, 0).to(tl.int64)
        kt = tl.load(kbase + ids64[:, None] * sk_l + offs_d[None, :], mask=valid[:, None], other=0.0)
        vt = tl.load(vbase + ids64[:, None] * sv_l + offs_d[None, :], mask=valid[:, None], other=0.0)
        s = _dot(q, tl.trans(kt), IEEE) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        p = tl.where(valid[None, :] & hmask[:, None], p, 0.0)
        dp = _dot(do, tl.trans(vt), IEEE)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(kt.dtype), kt, IEEE)
        dk_c = _dot(tl.trans(ds.to(q.dtype)), q, IEEE) * sm_scale
        dv_c = _dot(tl.trans(p.to(do.dtype)), do, IEEE)
        tl.atomic_add(dkbase + ids64[:, None] * sdk_l + offs_d[None, :], dk_c, mask=valid[:, None], sem="relaxed")
        tl.atomic_add(dvbase + ids64[:, None] * sdk_l + offs_d[None, :], dv_c, mask=valid[:, None], sem="relaxed")
    tl.store(DQ + b * sdq_b + t * sdq_l + heads[:, None] * sdq_h + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=hmask[:, None])


def _block_h(g: int) -> int:
    return max(16, triton.next_power_of_2(g))


def sparse_attention_fwd(q, k, v, idx, scale: float, causal_offset: int = -1, config: dict | None = None):
    """q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D] (any strides, D contiguous), idx [B, Lq, K] int32
    -> out [B, Lq, Hq, D] (q dtype), lse [B, Lq, Hq] float32 (base 2; +inf for a query with no key)."""
    cfg = {**FWD_CONFIG, **(config or {})}
    b, lq, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    out = torch.empty(b, lq, hq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, lq, hq, dtype=torch.float32, device=q.device)
    grid = (lq, hkv, b)
    _sparse_fwd_kernel[grid](q, k, v, idx, out, lse, scale * LOG2E,
                             q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                             v.stride(0), v.stride(1), v.stride(2), idx.stride(0), idx.stride(1),
                             out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
                             idx.shape[-1], causal_offset,
                             G=g, BH=_block_h(g), D=d, BK=cfg["block_k"], IEEE=q.dtype == torch.float32,
                             num_warps=cfg["num_warps"],
                             num_stages=cfg["num_stages"])
    return out, lse


def sparse_attention_bwd(q, k, v, idx, out, lse, dout, scale: float, causal_offset: int = -1,
                         config: dict | None = None):
    """Gradients of `sparse_attention_fwd`: -> dq [B, Lq, Hq, D], dk/dv [B, Lk, Hkv, D] (input dtypes)."""
    cfg = {**BWD_CONFIG, **(config or {})}
    b, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    delta = (dout.float() * out.float()).sum(-1).contiguous()  # [B, Lq, Hq]
    dq = torch.empty(b, lq, hq, d, dtype=q.dtype, device=q.device)
    dk = torch.zeros(b, lk, hkv, d, dtype=torch.float32, device=q.device)
    dv = torch.zeros_like(dk)
    grid = (lq, hkv, b)
    _sparse_bwd_kernel[grid](q, k, v, idx, dout, lse, delta, dq, dk, dv, scale * LOG2E, scale,
                             q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                             v.stride(0), v.stride(1), v.stride(2), idx.stride(0), idx.stride(1),
                             dout.stride(0), dout.stride(1), dout.stride(2), lse.stride(0), lse.stride(1),
                             dq.stride(0), dq.stride(1), dq.stride(2), dk.stride(0), dk.stride(1), dk.stride(2),
                             idx.shape[-1], causal_offset,
                             G=g, BH=_block_h(g), D=d, BK=cfg["block_k"], IEEE=q.dtype == torch.float32,
                             num_warps=cfg["num_warps"],
                             num_stages=cfg["num_stages"])
    return dq, dk.to(k.dtype), dv.to(v.dtype)


class _SparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, idx, scale, causal_offset):
        out, lse = sparse_attention_fwd(q, k, v, idx, scale, causal_offset)
        ctx.save_for_backward(q, k, v, idx, out, lse)
        ctx.scale, ctx.causal_offset = scale, causal_offset
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, idx, out, lse = ctx.saved_tensors
        dq, dk, dv = sparse_attention_bwd(q, k, v, idx, out, lse, dout, ctx.scale, ctx.causal_offset)
        return dq, dk, dv, None, None, None


def _d_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor,
                     scale: float | None = None, causal_offset: int = -1) -> torch.Tensor:
    """Differentiable sparse attention. q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D] (the transformers layout),
    idx [B, Lq, K] (-1 = empty) -> out [B, Lq, Hq, D]. causal_offset >= 0 promises valid-first index rows
    holding at most t + causal_offset + 1 valid slots (what `indexer_topk` produces) so the kernels skip the rest."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    idx = idx.to(torch.int32).contiguous()
    qt, kt, vt = (_d_contiguous(x.transpose(1, 2)) for x in (q, k, v))
    return _SparseAttention.apply(qt, kt, vt, idx, float(scale), int(causal_offset))
