"""Exact per-row top-k over bf16 scores by radix select (two 8-bit histogram passes, one compaction pass).

One program per query row reads only the row's causal candidates. Pass 1 counts the high byte of an
order-preserving 16-bit key, which fixes the bin holding the k-th largest score; pass 2 counts the low byte inside
that bin, which fixes the exact threshold key; pass 3 writes, in ascending key position, every index above the
threshold plus the first ones equal to it (ties go to the earlier key, as in the reference). This reads the
scores three times instead of sorting them; the output rows are sorted ascending, which helps the K/V gathers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _key16(x):
    """bf16 -> int32 in [0, 65535], increasing with the float value (-inf lowest)."""
    bits = x.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return tl.where(bits >= 0x8000, bits ^ 0xFFFF, bits ^ 0x8000)


@triton.jit
def _row_topk_kernel(S, OUT, ss_b, ss_l, so_b, so_l, q_start, n_keys, causal_offset, KK,
                     BLOCK: tl.constexpr):
    r = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    t = q_start + r
    n = tl.minimum(n_keys, t + causal_offset + 1)
    row = S + b * ss_b + r.to(tl.int64) * ss_l
    bins = tl.arange(0, 256)
    hist = tl.zeros([256], tl.int32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n
        key = _key16(tl.load(row + offs, mask=m, other=0.0))
        hist += tl.histogram(key >> 8, 256, mask=m)
    ge = tl.cumsum(hist, 0, reverse=True)  # ge[i] = how many keys have high byte >= i
    hi = tl.max(tl.where(ge >= KK, bins, -1), 0)
    above_hi = tl.sum(tl.where(bins > hi, hist, 0), 0)
    need = KK - above_hi
    hist2 = tl.zeros([256], tl.int32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n
        key = _key16(tl.load(row + offs, mask=m, other=0.0))
        hist2 += tl.histogram(key & 255, 256, mask=m & ((key >> 8) == hi))
    ge2 = tl.cumsum(hist2, 0, reverse=True)
    lo = tl.max(tl.where(ge2 >= need, bins, -1), 0)
    tau = hi * 256 + lo
    need_eq = need - tl.sum(tl.where(bins > lo, hist2, 0), 0)
    out_row = OUT + b * so_b + t.to(tl.int64) * so_l
    n_sel = tl.sum(tl.zeros([BLOCK], tl.int32), 0)
    n_eq = tl.sum(tl.zeros([BLOCK], tl.int32), 0)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n
        key = _key16(tl.load(row + offs, mask=m, other=0.0))
        gt = m & (key > tau)
        eq = (m & (key == tau)).to(tl.int32)
        sel = gt | ((eq > 0) & (n_eq + tl.cumsum(eq, 0) <= need_eq))
        sel_i = sel.to(tl.int32)
        pos = n_sel + tl.cumsum(sel_i, 0) - 1
        tl.store(out_row + pos, offs, mask=sel)
        n_sel += tl.sum(sel_i, 0)
        n_eq += tl.sum(eq, 0)


def row_topk_(scores: torch.Tensor, out: torch.Tensor, q_start: int, causal_offset: int, block: int = 2048) -> None:
    """For rows r of `scores` [B, R, n_keys] (bf16; query t = q_start + r sees keys <= t + causal_offset, and
    must have more than K of them) write the top-K key indices, ascending, into out[:, t, :] ([B, Lq, K] int32)."""
    b, rows, n_keys = scores.shape
    assert scores.dtype == torch.bfloat16 and scores.stride(-1) == 1 and out.stride(-1) == 1
    _row_topk_kernel[(rows, b)](scores, out, scores.stride(0), scores.stride(1), out.stride(0), out.stride(1),
                                q_start, n_keys, causal_offset, out.shape[-1], BLOCK=block, num_warps=8)


@triton.jit
def _ukey32(x):
    """fp32 -> int32 whose bit pattern, read unsigned, increases with the float value."""
    bits = x.to(tl.int32, bitcast=True)
    signed = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed order now matches the float order
    return signed ^ -2147483648  # flip the sign bit: unsigned order


@triton.jit
def _slots_topk32_kernel(V, OUT, sv_r, so_r, N, KK, BLOCK: tl.constexpr):
    """Row r of V [R, N] fp32 -> the slot numbers of its KK largest values (ties: earlier slot), OUT [R, KK]."""
    r = tl.program_id(0).to(tl.int64)
    row = V + r * sv_r
    bins = tl.arange(0, 256)
    need = KK
    prefix = 0
    for p in tl.static_range(4):
        shift = 24 - 8 * p
        hist = tl.zeros([256], tl.int32)
        for start in range(0, N, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < N
            u = _ukey32(tl.load(row + offs, mask=m, other=float("-inf")))
            digit = (u >> shift) & 255
            if p > 0:
                m = m & (((u >> (shift + 8)) & ((1 << (8 * p)) - 1)) == prefix)
            hist += tl.histogram(digit, 256, mask=m)
        ge = tl.cumsum(hist, 0, reverse=True)
        d = tl.max(tl.where(ge >= need, bins, -1), 0)
        need = need - tl.sum(tl.where(bins > d, hist, 0), 0)
        prefix = prefix * 256 + d
    tau = prefix ^ -2147483648  # back to the signed order
    out_row = OUT + r * so_r
    n_sel = tl.sum(tl.zeros([BLOCK], tl.int32), 0)
    n_eq = tl.sum(tl.zeros([BLOCK], tl.int32), 0)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < N
        key = _ukey32(tl.load(row + offs, mask=m, other=float("-inf"))) ^ -2147483648
        gt = m & (key > tau)
        eq = (m & (key == tau)).to(tl.int32)
        sel = gt | ((eq > 0) & (n_eq + tl.cumsum(eq, 0) <= need))
        sel_i = sel.to(tl.int32)
        pos = n_sel + tl.cumsum(sel_i, 0) - 1
        tl.store(out_row + pos, offs, mask=sel)
        n_sel += tl.sum(sel_i, 0)
        n_eq += tl.sum(eq, 0)


def slots_topk32(values: torch.Tensor, k: int, block: int = 2048) -> torch.Tensor:
    """values [..., N] fp32 (contiguous rows) -> int32 [..., k] positions of the k largest per row, ascending."""
    n = values.shape[-1]
    v = values.reshape(-1, n)
    assert v.dtype == torch.float32 and v.stride(-1) == 1 and k <= n
    out = torch.empty(v.shape[0], k, dtype=torch.int32, device=v.device)
    _slots_topk32_kernel[(v.shape[0],)](v, out, v.stride(0), out.stride(0), n, k, BLOCK=block, num_warps=8)
    return out.view(*values.shape[:-1], k)
