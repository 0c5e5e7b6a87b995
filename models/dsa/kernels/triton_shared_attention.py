"""Attention of a tile of queries over the keys they share (`tile_split.TileSplit`): Triton forward and backward.

One program per (query tile, KV head, batch). Its rows are the tile's block_m queries x the G query heads of the
KV head (128 rows for 16 queries x 8 heads), so every gathered K/V row feeds a full-height MMA instead of one
query's 8 heads: the gathered bytes per (query, key) pair drop by the number of tile queries sharing the key.
Each row's allowed keys are those whose mask bit for its query is set.

Forward: online softmax over the shared keys; writes the partial output (normalised) and its base-2 log-sum-exp
(-inf for a row with no shared key). The per-query kernel starts from this state and adds the private keys, so
the final output and log-sum-exp are those of the whole selection.
Backward: with the final log-sum-exp and delta = rowsum(dO * O), the probabilities of the shared keys are exact;
dQ of the tile's rows is added to an fp32 buffer (one owner per row), dK/dV per (tile, key) with fp32 atomics -
one atomic row per tile instead of one per sharing query.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tile_split import TileSplit
from .triton_common import LOG2E, _dot, _softmax_step

SHARED_FWD_CONFIG = {"block_n": 64, "num_warps": 8, "num_stages": 2}
SHARED_BWD_CONFIG = {"block_n": 32, "num_warps": 8, "num_stages": 2}


@triton.jit
def _tile_rows(tile, Lq, BM: tl.constexpr, G: tl.constexpr, R: tl.constexpr):
    """Rows of a tile program: r = query-in-tile * G + head-in-group. -> (query in tile, token, head, valid)."""
    r = tl.arange(0, R)
    qi = r // G
    t = tile * BM + qi
    valid = (r < BM * G) & (t < Lq)
    return qi, t.to(tl.int64), r % G, valid


@triton.jit
def _shared_fwd_kernel(Q, K, V, SIDX, SMASK, SCNT, Out, LSE, qk_scale,
                       sq_b, sq_l, sq_h, sk_b, sk_l, sk_h, sv_b, sv_l, sv_h,
                       ss_b, ss_t, sc_b, so_b, so_l, so_h, sl_b, sl_l, Lq,
                       G: tl.constexpr, BM: tl.constexpr, R: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
                       IEEE: tl.constexpr):
    tile = tl.program_id(0)
    g = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    qi, t, h, rvalid = _tile_rows(tile, Lq, BM, G, R)
    heads = g * G + h
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b * sq_b + t[:, None] * sq_l + heads[:, None] * sq_h + offs_d[None, :],
                mask=rvalid[:, None], other=0.0)
    m_i = tl.full((R,), float("-inf"), tl.float32)
    l_i = tl.zeros((R,), tl.float32)
    acc = tl.zeros((R, D), tl.float32)
    n = tl.load(SCNT + b * sc_b + tile)
    srow = SIDX + b * ss_b + tile.to(tl.int64) * ss_t
    mrow = SMASK + b * ss_b + tile.to(tl.int64) * ss_t
    kbase = K + b * sk_b + g * sk_h
    vbase = V + b * sv_b + g * sv_h
    for start in range(0, n, BN):
        offs_n = start + tl.arange(0, BN)
        inb = offs_n < n
        ids = tl.load(srow + offs_n, mask=inb, other=0).to(tl.int64)
        bits = tl.load(mrow + offs_n, mask=inb, other=0)
        allowed = ((bits[None, :] >> qi[:, None]) & 1) != 0
        kt = tl.load(kbase + ids[:, None] * sk_l + offs_d[None, :], mask=inb[:, None], other=0.0)
        vt = tl.load(vbase + ids[:, None] * sv_l + offs_d[None, :], mask=inb[:, None], other=0.0)
        m_i, l_i, acc = _softmax_step(q, kt, vt, allowed, m_i, l_i, acc, qk_scale, IEEE)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(Out + b * so_b + t[:, None] * so_l + heads[:, None] * so_h + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=rvalid[:, None])
    lse = tl.where(l_i > 0, m_i + tl.math.log2(l_safe), float("-inf"))
    tl.store(LSE + b * sl_b + t * sl_l + heads, lse, mask=rvalid)


@triton.jit
def _shared_bwd_kernel(Q, K, V, SIDX, SMASK, SCNT, DO, LSE, DELTA, DQ, DK, DV, qk_scale, sm_scale,
                       sq_b, sq_l, sq_h, sk_b, sk_l, sk_h, sv_b, sv_l, sv_h,
                       ss_b, ss_t, sc_b, sdo_b, sdo_l, sdo_h, sl_b, sl_l,
                       sdq_b, sdq_l, sdq_h, sdk_b, sdk_l, sdk_h, Lq, tile0, dq_row0,
                       G: tl.constexpr, BM: tl.constexpr, R: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
                       IEEE: tl.constexpr):
    """Tiles tile0 + program 0, 1, ...; DQ holds rows dq_row0 onwards (a block of rows' fp32 accumulator)."""
    tile = tile0 + tl.program_id(0)
    g = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    n = tl.load(SCNT + b * sc_b + tile)
    if n > 0:
        qi, t, h, rvalid = _tile_rows(tile, Lq, BM, G, R)
        heads = g * G + h
        offs_d = tl.arange(0, D)
        rowq = t[:, None] * sq_l + heads[:, None] * sq_h + offs_d[None, :]
        q = tl.load(Q + b * sq_b + rowq, mask=rvalid[:, None], other=0.0)
        do = tl.load(DO + b * sdo_b + t[:, None] * sdo_l + heads[:, None] * sdo_h + offs_d[None, :],
                     mask=rvalid[:, None], other=0.0)
        lse = tl.load(LSE + b * sl_b + t * sl_l + heads, mask=rvalid, other=float("inf"))
        delta = tl.load(DELTA + b * sl_b + t * sl_l + heads, mask=rvalid, other=0.0)
        dq = tl.zeros((R, D), tl.float32)
        srow = SIDX + b * ss_b + tile.to(tl.int64) * ss_t
        mrow = SMASK + b * ss_b + tile.to(tl.int64) * ss_t
        kbase = K + b * sk_b + g * sk_h
        vbase = V + b * sv_b + g * sv_h
        dkbase = DK + b * sdk_b + g * sdk_h
        dvbase = DV + b * sdk_b + g * sdk_h
        for start in range(0, n, BN):
            offs_n = start + tl.arange(0, BN)
            inb = offs_n < n
            ids = tl.load(srow + offs_n, mask=inb, other=0).to(tl.int64)
            bits = tl.load(mrow + offs_n, mask=inb, other=0)
            allowed = (((bits[None, :] >> qi[:, None]) & 1) != 0) & rvalid[:, None]
            kt = tl.load(kbase + ids[:, None] * sk_l + offs_d[None, :], mask=inb[:, None], other=0.0)
            vt = tl.load(vbase + ids[:, None] * sv_l + offs_d[None, :], mask=inb[:, None], other=0.0)
            s = _dot(q, tl.trans(kt), IEEE) * qk_scale
            pr = tl.where(allowed, tl.math.exp2(s - lse[:, None]), 0.0)
            dp = _dot(do, tl.trans(vt), IEEE)
            ds = pr * (dp - delta[:, None])
            dq += _dot(ds.to(kt.dtype), kt, IEEE)
            dk_c = _dot(tl.trans(ds.to(q.dtype)), q, IEEE) * sm_scale
            dv_c = _dot(tl.trans(pr.to(do.dtype)), do, IEEE)
            tl.atomic_add(dkbase + ids[:, None] * sdk_l + offs_d[None, :], dk_c, mask=inb[:, None], sem="relaxed")
            tl.atomic_add(dvbase + ids[:, None] * sdk_l + offs_d[None, :], dv_c, mask=inb[:, None], sem="relaxed")
        dq_ptr = DQ + b * sdq_b + (t - dq_row0)[:, None] * sdq_l + heads[:, None] * sdq_h + offs_d[None, :]
        tl.store(dq_ptr, tl.load(dq_ptr, mask=rvalid[:, None], other=0.0) + dq * sm_scale, mask=rvalid[:, None])


def _rows(block_m: int, g: int) -> int:
    return max(16, triton.next_power_of_2(block_m * g))


def shared_attention_fwd(q, k, v, split: TileSplit, scale: float, out: torch.Tensor, lse: torch.Tensor,
                         config: dict | None = None) -> None:
    """q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D] (D contiguous) -> writes each row's partial output over its shared
    keys into out [B, Lq, Hq, D] and the base-2 log-sum-exp into lse [B, Lq, Hq] (-inf: no shared key)."""
    cfg = {**SHARED_FWD_CONFIG, **(config or {})}
    b, lq, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    n_tiles = split.shared_idx.shape[1]
    _shared_fwd_kernel[(n_tiles, hkv, b)](
        q, k, v, split.shared_idx, split.shared_mask, split.shared_count, out, lse, scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), split.shared_idx.stride(0), split.shared_idx.stride(1),
        split.shared_count.stride(0), out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1), lq,
        G=g, BM=split.block_m, R=_rows(split.block_m, g), D=d, BN=cfg["block_n"], IEEE=q.dtype == torch.float32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def shared_attention_bwd(q, k, v, split: TileSplit, dout, lse, delta, scale: float, dq: torch.Tensor,
                         dk: torch.Tensor, dv: torch.Tensor, config: dict | None = None,
                         tiles: tuple[int, int] | None = None) -> None:
    """Adds the shared keys' gradients: dq (+=, fp32), dk/dv [B, Lk, Hkv, D] fp32 (atomic +=). lse [B, Lq, Hq]
    is the final (whole-selection) base-2 log-sum-exp, delta [B, Lq, Hq] = rowsum(dO * O). `tiles` (t0, t1):
    only those tiles, and dq [B, rows, Hq, D] holds their rows from t0 * block_m on; default every tile, dq
    [B, Lq, Hq, D]."""
    cfg = {**SHARED_BWD_CONFIG, **(config or {})}
    b, lq, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    t0, t1 = tiles or (0, split.shared_idx.shape[1])
    if t1 <= t0:
        return
    _shared_bwd_kernel[(t1 - t0, hkv, b)](
        q, k, v, split.shared_idx, split.shared_mask, split.shared_count, dout, lse, delta, dq, dk, dv,
        scale * LOG2E, scale,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), split.shared_idx.stride(0), split.shared_idx.stride(1),
        split.shared_count.stride(0), dout.stride(0), dout.stride(1), dout.stride(2), lse.stride(0), lse.stride(1),
        dq.stride(0), dq.stride(1), dq.stride(2), dk.stride(0), dk.stride(1), dk.stride(2), lq, t0,
        t0 * split.block_m, G=g, BM=split.block_m, R=_rows(split.block_m, g), D=d, BN=cfg["block_n"],
        IEEE=q.dtype == torch.float32, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
