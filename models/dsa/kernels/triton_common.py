"""Triton pieces shared by the sparse attention kernels (per query, per query tile, decode)."""

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
