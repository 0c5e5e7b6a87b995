"""Exact top-k of one long score row per sequence (a decode step's indexer) in three launches, no sort.

`torch.topk` on a single 128K-key row runs one multi-pass radix select per 8 bits of its keys, each pass a few
launches with little parallelism: it cost most of a batch-1 decode step. Here the row is spread over many
programs and selected by a radix select on the scores' 32 order-preserving bits, 12 + 12 + 8:

1. `_score_hist_kernel` (programs over chunks of the row): the index scores (as in `triton_decode`), stored as
   order-preserving int32 keys, and the histogram of their top 12 bits, added atomically per row.
2. `_pick_kernel` (the same programs): every program reads the row's histogram and finds the bin t1 that holds
   the k-th largest key; keys above t1 are selected (written to the output by an atomic slot counter), keys in
   t1 are appended to a candidate list: usually a few hundred of the row's keys.
3. `_finish_kernel` (one program per row): the exact top-`need` of the candidates by their remaining 20 bits
   (two histogram passes), and, where keys tie at the threshold, the earliest positions among them (a radix
   select on the positions, only then): ties go to the earlier key, the rule of the prefill path.
The selected positions come out unordered (attention does not care).
Shapes: index q [B, 1, H_I, d_I], index keys [B, L, d_I], weights [B, 1, H_I] -> idx [B, 1, k] int32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import _decode_keys, _decode_query

# chunk: keys per program of passes 1-2; block_n: keys per step inside it; block: candidates per step of pass 3
RADIX_CONFIG = {"chunk": 1024, "block_n": 256, "block": 2048, "num_warps": 4}
_BINS1 = 4096  # top 12 bits of the 32-bit key


@triton.jit
def _unsigned(ordered):
    """Signed order-preserving int32 key -> the same order as a non-negative int64 in [0, 2^32)."""
    return ordered.to(tl.int64) + 2147483648


@triton.jit
def _score_hist_kernel(Q, K, W, U, HIST, sq_b, sq_h, sk_b, sk_l, sw_b, su_b, sh_b, n_keys, chunk,
                       H: tl.constexpr, HP: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
                       IEEE: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    q, w = _decode_query(Q, W, b, sq_b, sq_h, sw_b, H, HP, D)
    hist = tl.zeros([4096], tl.int32)
    start = pid * chunk
    end = tl.minimum(start + chunk, n_keys)
    for c0 in range(start, end, BN):
        cols = c0 + tl.arange(0, BN)
        inb = cols < end
        ordered = _decode_keys(q, w, K, b, sk_b, sk_l, cols, inb, D, IEEE)
        tl.store(U + b * su_b + cols, ordered, mask=inb)
        hist += tl.histogram((_unsigned(ordered) >> 20).to(tl.int32), 4096, mask=inb)
    tl.atomic_add(HIST + b * sh_b + tl.arange(0, 4096), hist, mask=hist > 0, sem="relaxed")


@triton.jit
def _threshold_bin(hist, need, NB: tl.constexpr):
    """The bin holding the need-th largest key (bins in increasing key order), and how many keys lie above it."""
    bins = tl.arange(0, NB)
    ge = tl.cumsum(hist, 0, reverse=True)
    t = tl.max(tl.where(ge >= need, bins, -1), 0)
    above = tl.sum(tl.where(bins > t, hist, 0), 0)
    return t, above


@triton.jit
def _pick_kernel(U, HIST, OUT, CAND, su_b, sh_b, so_b, sc_b, n_keys, chunk, KK, BN: tl.constexpr):
    """HIST [B, 4096 + 2]: the level-1 histogram, then the output's and the candidate list's slot counters."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    hist = tl.load(HIST + b * sh_b + tl.arange(0, 4096))
    t1, _ = _threshold_bin(hist, KK, 4096)
    start = pid * chunk
    end = tl.minimum(start + chunk, n_keys)
    for c0 in range(start, end, BN):
        cols = c0 + tl.arange(0, BN)
        inb = cols < end
        d1 = _unsigned(tl.load(U + b * su_b + cols, mask=inb, other=0)) >> 20
        gt = (inb & (d1 > t1)).to(tl.int32)
        n_gt = tl.sum(gt, 0)
        if n_gt > 0:
            base = tl.atomic_add(HIST + b * sh_b + 4096, n_gt, sem="relaxed")
            tl.store(OUT + b * so_b + base + tl.cumsum(gt, 0) - 1, cols, mask=gt > 0)
        eq = (inb & (d1 == t1)).to(tl.int32)
        n_eq = tl.sum(eq, 0)
        if n_eq > 0:
            base = tl.atomic_add(HIST + b * sh_b + 4097, n_eq, sem="relaxed")
            tl.store(CAND + b * sc_b + base + tl.cumsum(eq, 0) - 1, cols, mask=eq > 0)


@triton.jit
def _candidates(CAND, U, b, sc_b, su_b, s0, n_cand, BLOCK: tl.constexpr):
    """Candidates s0 .. s0 + BLOCK of row b: (in range, position, unsigned key)."""
    offs = s0 + tl.arange(0, BLOCK)
    m = offs < n_cand
    pos = tl.load(CAND + b * sc_b + offs, mask=m, other=0)
    return m, pos, _unsigned(tl.load(U + b * su_b + pos, mask=m, other=0))


@triton.jit
def _finish_kernel(U, HIST, OUT, CAND, su_b, sh_b, so_b, sc_b, KK, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    bins = tl.arange(0, 4096)
    hist1 = tl.load(HIST + b * sh_b + bins)
    t1, above1 = _threshold_bin(hist1, KK, 4096)
    n_cand = tl.sum(tl.where(bins == t1, hist1, 0), 0)
    need = KK - above1
    # level 2: bits 8..19 of the candidates' keys
    hist2 = tl.zeros([4096], tl.int32)
    for s0 in range(0, n_cand, BLOCK):
        m, pos, u = _candidates(CAND, U, b, sc_b, su_b, s0, n_cand, BLOCK)
        hist2 += tl.histogram(((u >> 8) & 4095).to(tl.int32), 4096, mask=m)
    t2, above2 = _threshold_bin(hist2, need, 4096)
    need2 = need - above2
    # level 3: the low 8 bits of the candidates in bin t2
    hist3 = tl.zeros([256], tl.int32)
    for s0 in range(0, n_cand, BLOCK):
        m, pos, u = _candidates(CAND, U, b, sc_b, su_b, s0, n_cand, BLOCK)
        hist3 += tl.histogram((u & 255).to(tl.int32), 256, mask=m & (((u >> 8) & 4095) == t2))
    t3, above3 = _threshold_bin(hist3, need2, 256)
    n_tie = tl.sum(tl.where(tl.arange(0, 256) == t3, hist3, 0), 0)
    need_tie = need2 - above3
    thr = (t1.to(tl.int64) << 20) | (t2.to(tl.int64) << 8) | t3.to(tl.int64)
    last = thr * 0 + 2147483647  # ties at positions <= last are taken: all of them, unless there are too many
    if n_tie > need_tie:  # the need_tie-th earliest position among the tied keys, 10 bits at a time
        last = thr * 0
        rest = need_tie
        for level in tl.static_range(3):
            hp = tl.zeros([1024], tl.int32)
            for s0 in range(0, n_cand, BLOCK):
                m, pos, u = _candidates(CAND, U, b, sc_b, su_b, s0, n_cand, BLOCK)
                pos = pos.to(tl.int64)
                same = (pos >> (30 - 10 * level)) == (last >> (30 - 10 * level))  # the bits fixed so far
                hp += tl.histogram(((pos >> (20 - 10 * level)) & 1023).to(tl.int32), 1024,
                                   mask=m & (u == thr) & same)
            le = tl.cumsum(hp, 0)  # ascending: the earliest positions first
            pb = tl.min(tl.where(le >= rest, tl.arange(0, 1024), 1024), 0)
            rest -= tl.sum(tl.where(tl.arange(0, 1024) < pb, hp, 0), 0)
            last = last | (pb.to(tl.int64) << (20 - 10 * level))
    n_out = above1
    for s0 in range(0, n_cand, BLOCK):
        m, pos, u = _candidates(CAND, U, b, sc_b, su_b, s0, n_cand, BLOCK)
        sel = (m & ((u > thr) | ((u == thr) & (pos.to(tl.int64) <= last)))).to(tl.int32)
        tl.store(OUT + b * so_b + n_out + tl.cumsum(sel, 0) - 1, pos, mask=sel > 0)
        n_out += tl.sum(sel, 0)


def radix_decode_select(qi: torch.Tensor, ki: torch.Tensor, wi: torch.Tensor, kk: int) -> torch.Tensor:
    """qi [B, 1, H_I, d_I], ki [B, L, d_I], wi [B, 1, H_I] float32, kk < L -> idx [B, 1, kk] int32: the exact
    top-kk index scores of each sequence, ties to the earlier key (module docstring)."""
    b, _, h, d = qi.shape
    n_keys = ki.shape[1]
    if n_keys >= 1 << 30:
        raise ValueError(f"radix_decode_select: {n_keys} cached keys; positions must fit 30 bits")
    cfg = RADIX_CONFIG
    dev = qi.device
    keys = torch.empty(b, n_keys, dtype=torch.int32, device=dev)
    cand = torch.empty(b, n_keys, dtype=torch.int32, device=dev)
    hist = torch.zeros(b, _BINS1 + 2, dtype=torch.int32, device=dev)  # level-1 histogram + 2 slot counters
    out = torch.empty(b, kk, dtype=torch.int32, device=dev)
    chunk = cfg["chunk"]
    grid = (triton.cdiv(n_keys, chunk), b)
    _score_hist_kernel[grid](qi, ki, wi, keys, hist, qi.stride(0), qi.stride(2), ki.stride(0), ki.stride(1),
                             wi.stride(0), keys.stride(0), hist.stride(0), n_keys, chunk, H=h,
                             HP=max(16, triton.next_power_of_2(h)), D=d, BN=cfg["block_n"],
                             IEEE=qi.dtype == torch.float32, num_warps=cfg["num_warps"])
    _pick_kernel[grid](keys, hist, out, cand, keys.stride(0), hist.stride(0), out.stride(0), cand.stride(0),
                       n_keys, chunk, kk, BN=cfg["block_n"], num_warps=cfg["num_warps"])
    _finish_kernel[(b,)](keys, hist, out, cand, keys.stride(0), hist.stride(0), out.stride(0), cand.stride(0), kk,
                         BLOCK=cfg["block"], num_warps=cfg["num_warps"])
    return out[:, None, :]
