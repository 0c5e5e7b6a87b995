"""Triton pieces shared by the DSA kernels (sparse attention per query, per query tile, decode)."""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """tl.dot, in true fp32 for fp32 inputs (the float32 checks), tensor-core bf16/tf32 otherwise."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _softmax_step(q, kt, vt, allowed, m_i, l_i, acc, qk_scale, IEEE: tl.constexpr):
    """One block of the streaming (online) softmax, base 2: q [M, D], gathered kt/vt [N, D], allowed [M, N]
    (or broadcastable); running max m_i [M], sum l_i [M], output acc [M, D] -> updated (m_i, l_i, acc)."""
    s = _dot(q, tl.trans(kt), IEEE) * qk_scale
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(vt.dtype), vt, IEEE)
    return m_new, l_i, acc


@triton.jit
def _decode_keys(q, w, K, b, sk_b, sk_l, cols, inb, D: tl.constexpr, IEEE: tl.constexpr):
    """Index scores of one decode query against cached index keys `cols` (inb: in range), as order-preserving
    int32 keys: q [HP, D] index query (padded heads zero), w [HP] head weights -> [BN] int32 whose signed order
    is the scores' float order; -0.0 (all terms zero) ties with +0.0, as in the reference's ranking."""
    offs_d = tl.arange(0, D)
    kblk = tl.load(K + b * sk_b + cols[:, None].to(tl.int64) * sk_l + offs_d[None, :], mask=inb[:, None], other=0.0)
    score = tl.sum(tl.maximum(_dot(kblk, tl.trans(q), IEEE), 0.0) * w[None, :], 1)
    score = tl.where(score == 0.0, 0.0, score)
    bits = score.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _decode_query(Q, W, b, sq_b, sq_h, sw_b, H: tl.constexpr, HP: tl.constexpr, D: tl.constexpr):
    """Sequence b's decode index query [HP, D] and head weights [HP] (H real heads, zero padded to HP)."""
    offs_h = tl.arange(0, HP)
    q = tl.load(Q + b * sq_b + offs_h[:, None] * sq_h + tl.arange(0, D)[None, :], mask=offs_h[:, None] < H,
                other=0.0)
    return q, tl.load(W + b * sw_b + offs_h, mask=offs_h < H, other=0.0)
