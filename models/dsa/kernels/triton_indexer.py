"""Indexer scores + top-k on the GPU without the L x L score matrix.

Score: sum_j w_j ReLU(q_j . k), fp32 accumulation, one shared index key per position (MQA-style).

Default path, `method="stream"` (streaming selection, memory O(L * k)):
  1. threshold: score every query against a strided subsample of the keys (1 in `sub_stride`) and take, per row,
     a value that about 1.5 k of the row's scores exceed (the j-th largest of the subsample);
  2. one fused pass: a Triton kernel computes the scores tile by tile and appends those at or above the row's
     threshold to a per-row candidate list (capacity 2 k; by default one program walks all key tiles of its
     rows with the list counters in registers, see SELECT_APPEND); nothing else is written;
  3. `torch.topk` keeps the best k of each candidate list. Rows whose list came out short (< k) or overflowed
     (> 2 k) - a subsample that misjudged the row - are redone exactly by the chunked path, so the result is
     always the exact top-k.
`method="chunked"`: score a block of query rows against all their keys into a bounded buffer (`max_chunk_elems`
scores) and select per row (radix-select kernel of `triton_topk` on bf16 scores, or `torch.topk` on fp32).
Rows with at most k candidates take all of them without scoring (exactly dense attention). Index rows are
"valid-first": empty slots (-1) only at the end, which the attention kernels rely on.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .stage_clock import StageClock
from .triton_topk import row_topk_, slots_topk32

# fallback_rows: rows the last streaming call redid exactly; with profile=True the streaming path records the
# milliseconds of its stages (threshold, fused select, final top-k) in stage_ms (benchmarks / tuning)
STATS: dict = {"fallback_rows": 0, "profile": False, "stage_ms": {}}
# how the best k of each candidate list are chosen: "radix" (Triton radix select on fp32) or "torch" (torch.topk)
FINAL_SELECT = "torch"
# how the fused pass appends candidates: "atomic" (one atomic per selected score), "scan" (one per row and tile
# plus a prefix sum) or "loop" (one program walks all key tiles of its rows, counters in registers, no atomics);
# all measured by bench/bench_dsa.py
SELECT_APPEND = "loop"
# launch settings of the fused score + select pass (rows and keys per tile, warps, pipeline depth)
SELECT_CONFIG = {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2}
# score with float8 e4m3 index queries/keys (per-token scales) by default; measured by bench/bench_dsa.py
INDEXER_FP8 = False
# bytes of candidate lists held at once: the streaming selection works on blocks of rows that fit
SELECT_MEMORY = 1 << 30


@triton.jit
def _scores_tile(Q, K, W, SK, b, rows, cols, n_rows, n_keys, sq_b, sq_l, sq_h, sk_b, sk_l, sw_b, sw_l, ss_b,
                 KEY_STRIDE: tl.constexpr, H: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 IEEE: tl.constexpr, KSCALE: tl.constexpr):
    """[BM, BN] fp32 scores of query rows `rows` against keys `cols * KEY_STRIDE`. KSCALE: Q/K are fp8 and each
    key's score is multiplied by its dequantisation scale SK[b, key] (the queries' scales are folded into W)."""
    offs_d = tl.arange(0, D)
    t = rows.to(tl.int64)
    key = (cols * KEY_STRIDE).to(tl.int64)
    kblk = tl.load(K + b * sk_b + key[:, None] * sk_l + offs_d[None, :], mask=cols[:, None] < n_keys, other=0.0)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    rmask = rows < n_rows
    for h in tl.static_range(H):
        qh = tl.load(Q + b * sq_b + t[:, None] * sq_l + h * sq_h + offs_d[None, :], mask=rmask[:, None], other=0.0)
        if IEEE:
            s = tl.dot(qh, tl.trans(kblk), input_precision="ieee")
        else:
            s = tl.dot(qh, tl.trans(kblk))
        wh = tl.load(W + b * sw_b + t * sw_l + h, mask=rmask, other=0.0)
        acc += tl.maximum(s, 0.0) * wh[:, None]
    if KSCALE:
        acc *= tl.load(SK + b * ss_b + key, mask=cols < n_keys, other=0.0)[None, :]
    return acc


@triton.jit
def _index_score_kernel(Q, K, W, SK, S,
                        sq_b, sq_l, sq_h, sk_b, sk_l, sw_b, sw_l, skb, ss_b, ss_l,
                        q_start, n_rows, n_keys, causal_offset,
                        KEY_STRIDE: tl.constexpr, H: tl.constexpr, D: tl.constexpr, BM: tl.constexpr,
                        BN: tl.constexpr, IEEE: tl.constexpr, KSCALE: tl.constexpr):
    """Scores of rows [q_start, q_start + n_rows) into S[b, row - q_start, col]; masked keys get -inf."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    local = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    rows = q_start + local
    s_base = S + b * ss_b  # one chunk holds < 2**31 scores per batch row, so tile offsets fit in int32
    smask = (local[:, None] < n_rows) & (cols[None, :] < n_keys)
    if pid_n * BN * KEY_STRIDE > q_start + pid_m * BM + BM - 1 + causal_offset:
        tl.store(s_base + local[:, None] * ss_l + cols[None, :],
                 tl.full((BM, BN), float("-inf"), tl.float32).to(S.dtype.element_ty), mask=smask)
    else:
        acc = _scores_tile(Q, K, W, SK, b, rows, cols, q_start + n_rows, n_keys, sq_b, sq_l, sq_h, sk_b, sk_l,
                           sw_b, sw_l, skb, KEY_STRIDE, H, D, BM, BN, IEEE, KSCALE)
        acc = tl.where(cols[None, :] * KEY_STRIDE <= (rows + causal_offset)[:, None], acc, float("-inf"))
        tl.store(s_base + local[:, None] * ss_l + cols[None, :], acc.to(S.dtype.element_ty), mask=smask)


@triton.jit
def _score_select_kernel(Q, K, W, SK, TAU, CNT, CVAL, CIDX,
                         sq_b, sq_l, sq_h, sk_b, sk_l, sw_b, sw_l, skb, st_b, sn_b, sc_b, sc_l,
                         q_start, n_rows, n_keys, causal_offset, CAP, KK,
                         H: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                         IEEE: tl.constexpr, ATOMIC: tl.constexpr, KSCALE: tl.constexpr):
    """Append the causal scores > TAU[row] to slots [0, CAP) of the row's candidate list and those == TAU
    (ties, common with ReLU zeros) to slots [CAP, CAP + KK); CNT[b, 0/1, row] count both kinds."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows = q_start + pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    if pid_n * BN <= q_start + pid_m * BM + BM - 1 + causal_offset:
        acc = _scores_tile(Q, K, W, SK, b, rows, cols, n_rows, n_keys, sq_b, sq_l, sq_h, sk_b, sk_l, sw_b, sw_l,
                           skb, 1, H, D, BM, BN, IEEE, KSCALE)
        rmask = rows < n_rows
        tau = tl.load(TAU + b * st_b + rows, mask=rmask, other=float("inf"))
        valid = (cols[None, :] <= (rows + causal_offset)[:, None]) & rmask[:, None] & (cols[None, :] < n_keys)
        row_off = b * sc_b + (rows - q_start)[:, None].to(tl.int64) * sc_l  # lists start at row q_start
        col_val = tl.broadcast_to(cols[None, :], (BM, BN))
        cnt_gt = CNT + b * sn_b + rows
        cnt_eq = cnt_gt + st_b  # CNT is [B, 2, Lq] and TAU [B, Lq]: the second counter row is st_b (= Lq) on
        gt = valid & (acc > tau[:, None])
        eq = valid & (acc == tau[:, None])
        if ATOMIC:  # one atomic per selected score: cheap when few pass (about 1.5 k of each row's keys)
            pos = tl.atomic_add(tl.broadcast_to(cnt_gt[:, None], (BM, BN)), 1, mask=gt, sem="relaxed")
            keep = gt & (pos < CAP)
            tl.store(CVAL + row_off + pos, acc, mask=keep)
            tl.store(CIDX + row_off + pos, col_val, mask=keep)
            if tl.sum(eq.to(tl.int32)) > 0:
                pos = tl.atomic_add(tl.broadcast_to(cnt_eq[:, None], (BM, BN)), 1, mask=eq, sem="relaxed")
                keep = eq & (pos < KK)
                tl.store(CVAL + row_off + CAP + pos, acc, mask=keep)
                tl.store(CIDX + row_off + CAP + pos, col_val, mask=keep)
        else:  # one atomic per row and tile, positions by a prefix sum along the row
            gti = gt.to(tl.int32)
            n_gt = tl.sum(gti, 1)
            base = tl.atomic_add(cnt_gt, n_gt, mask=rmask & (n_gt > 0), sem="relaxed")
            pos = base[:, None] + tl.cumsum(gti, 1) - 1
            keep = gt & (pos < CAP)
            tl.store(CVAL + row_off + pos, acc, mask=keep)
            tl.store(CIDX + row_off + pos, col_val, mask=keep)
            eqi = eq.to(tl.int32)
            n_eq = tl.sum(eqi, 1)
            if tl.sum(n_eq) > 0:
                base = tl.atomic_add(cnt_eq, n_eq, mask=rmask & (n_eq > 0), sem="relaxed")
                pos = base[:, None] + tl.cumsum(eqi, 1) - 1
                keep = eq & (pos < KK)
                tl.store(CVAL + row_off + CAP + pos, acc, mask=keep)
                tl.store(CIDX + row_off + CAP + pos, col_val, mask=keep)


@triton.jit
def _score_select_loop_kernel(Q, K, W, SK, TAU, CNT, CVAL, CIDX,
                              sq_b, sq_l, sq_h, sk_b, sk_l, sw_b, sw_l, skb, st_b, sn_b, sc_b, sc_l,
                              q_start, n_rows, n_keys, causal_offset, CAP, KK, n_blocks,
                              H: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                              IEEE: tl.constexpr, KSCALE: tl.constexpr):
    """Like `_score_select_kernel`, but one program owns a block of BM query rows and walks all its causal key
    tiles, so the per-row list counters live in registers: no atomics, one prefix sum per row and tile.
    Row blocks are taken longest first (the causal triangle), which balances the SMs."""
    pid_m = n_blocks - 1 - tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = q_start + pid_m * BM + tl.arange(0, BM)
    rmask = rows < n_rows
    tau = tl.load(TAU + b * st_b + rows, mask=rmask, other=float("inf"))
    row_off = b * sc_b + (rows - q_start)[:, None].to(tl.int64) * sc_l  # lists start at row q_start
    n_gt = tl.zeros((BM,), tl.int32)
    n_eq = tl.zeros((BM,), tl.int32)
    key_end = tl.minimum(n_keys, q_start + pid_m * BM + BM + causal_offset)  # keys seen by the block's last row
    for c0 in range(0, key_end, BN):
        cols = c0 + tl.arange(0, BN)
        acc = _scores_tile(Q, K, W, SK, b, rows, cols, n_rows, n_keys, sq_b, sq_l, sq_h, sk_b, sk_l, sw_b, sw_l,
                           skb, 1, H, D, BM, BN, IEEE, KSCALE)
        valid = (cols[None, :] <= (rows + causal_offset)[:, None]) & rmask[:, None] & (cols[None, :] < n_keys)
        col_val = tl.broadcast_to(cols[None, :], (BM, BN))
        gti = (valid & (acc > tau[:, None])).to(tl.int32)
        pos = n_gt[:, None] + tl.cumsum(gti, 1) - 1
        keep = (gti > 0) & (pos < CAP)
        tl.store(CVAL + row_off + pos, acc, mask=keep)
        tl.store(CIDX + row_off + pos, col_val, mask=keep)
        n_gt += tl.sum(gti, 1)
        eqi = (valid & (acc == tau[:, None])).to(tl.int32)
        n_eq_tile = tl.sum(eqi, 1)
        if tl.max(n_eq_tile, 0) > 0:  # ties at the threshold are rare: skip their prefix sum otherwise
            pos = n_eq[:, None] + tl.cumsum(eqi, 1) - 1
            keep = (eqi > 0) & (pos < KK)
            tl.store(CVAL + row_off + CAP + pos, acc, mask=keep)
            tl.store(CIDX + row_off + CAP + pos, col_val, mask=keep)
        n_eq += n_eq_tile
    tl.store(CNT + b * sn_b + rows, n_gt, mask=rmask)
    tl.store(CNT + b * sn_b + st_b + rows, n_eq, mask=rmask)


def index_scores(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, q_start: int, n_rows: int, n_keys: int,
                 causal_offset: int, out: torch.Tensor, key_stride: int = 1, block_m: int = 64,
                 block_n: int = 128, num_warps: int = 8, k_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Scores of query rows [q_start, q_start+n_rows) against keys 0, s, 2s, ... (s = key_stride; n_keys of them):
    out [B, n_rows, n_keys]. q [B, Lq, H, d] (d contiguous), k [B, Lk, d], w [B, Lq, H] float32; key j*s is
    allowed for query t when j*s <= t + causal_offset, others get -inf. k_scale [B, Lk] float32: q/k are fp8
    (`quantize_fp8`) and key j's scores are multiplied by its scale."""
    b, _, h, d = q.shape
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and w.stride(-1) == 1
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_keys, block_n), b)
    sk = w if k_scale is None else k_scale
    _index_score_kernel[grid](q, k, w, sk, out,
                              q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
                              w.stride(0), w.stride(1), sk.stride(0), out.stride(0), out.stride(1),
                              q_start, n_rows, n_keys, causal_offset,
                              KEY_STRIDE=key_stride, H=h, D=d, BM=block_m, BN=block_n,
                              IEEE=q.dtype == torch.float32, KSCALE=k_scale is not None, num_warps=num_warps,
                              num_stages=2)
    return out


def _chunked_rows(q, k, w, idx, start: int, end: int, kk: int, score_dtype, max_chunk_elems: int,
                  k_scale: torch.Tensor | None = None, sort_rows: bool = False) -> None:
    """Exact top-k of rows [start, end) (each with more than kk candidates) by scoring bounded row blocks; the
    radix select (bf16) writes each row sorted ascending, torch.topk (fp32) only with sort_rows."""
    b, lq = q.shape[:2]
    lk = k.shape[1]
    off = lk - lq
    chunk = max(64, (max_chunk_elems // max(1, b * lk)) // 64 * 64)
    buf = torch.empty(b * min(chunk, end - start) * lk, dtype=score_dtype, device=q.device)
    for s0 in range(start, end, chunk):
        rows = min(chunk, end - s0)
        n_keys = min(lk, s0 + rows + off)
        s = buf[: b * rows * n_keys].view(b, rows, n_keys)
        index_scores(q, k, w, s0, rows, n_keys, off, s, k_scale=k_scale)
        if score_dtype == torch.bfloat16:
            row_topk_(s, idx, s0, off)
        else:
            top = torch.topk(s, kk, dim=-1, sorted=False).indices.to(torch.int32)
            idx[:, s0:s0 + rows] = top.sort(-1).values if sort_rows else top


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """Sorted row numbers -> [start, end) ranges of consecutive rows."""
    out: list[tuple[int, int]] = []
    for r in rows:
        if out and out[-1][1] == r:
            out[-1] = (out[-1][0], r + 1)
        else:
            out.append((r, r + 1))
    return out


def _select_candidates(q, k, w, tau, cnt, cval, cidx, r0: int, r1: int, lk: int, off: int, cap: int,
                       kk: int, k_scale: torch.Tensor | None) -> None:
    """The fused score + append pass for query rows [r0, r1): candidates at or above each row's threshold tau
    into cval/cidx [B, r1 - r0, cap + kk] (ties at the threshold from slot cap), counts into cnt [B, 2, Lq]."""
    b = q.shape[0]
    sc = SELECT_CONFIG
    bm, bn = sc["block_m"], sc["block_n"]
    sk = w if k_scale is None else k_scale
    if SELECT_APPEND == "loop":
        n_blocks = triton.cdiv(r1 - r0, bm)
        _score_select_loop_kernel[(n_blocks, b)](q, k, w, sk, tau, cnt, cval, cidx,
                                                 q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
                                                 w.stride(0), w.stride(1), sk.stride(0), tau.stride(0), cnt.stride(0),
                                                 cval.stride(0), cval.stride(1), r0, r1, lk, off, cap, kk,
                                                 n_blocks, H=q.shape[2], D=q.shape[3], BM=bm, BN=bn,
                                                 IEEE=q.dtype == torch.float32, KSCALE=k_scale is not None,
                                                 num_warps=sc["num_warps"], num_stages=sc["num_stages"])
    else:
        grid = (triton.cdiv(r1 - r0, bm), triton.cdiv(lk, bn), b)
        _score_select_kernel[grid](q, k, w, sk, tau, cnt, cval, cidx,
                                   q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
                                   w.stride(0), w.stride(1), sk.stride(0), tau.stride(0), cnt.stride(0), cval.stride(0),
                                   cval.stride(1), r0, r1, lk, off, cap, kk, H=q.shape[2], D=q.shape[3],
                                   BM=bm, BN=bn, IEEE=q.dtype == torch.float32, ATOMIC=SELECT_APPEND == "atomic",
                                   KSCALE=k_scale is not None, num_warps=sc["num_warps"],
                                   num_stages=sc["num_stages"])


def _stream_rows(q, k, w, idx, start: int, kk: int, sub_stride: int, max_chunk_elems: int,
                 k_scale: torch.Tensor | None = None, sort_rows: bool = False) -> int:
    """Exact top-k of rows [start, Lq) by threshold + fused selection (each row sorted ascending with
    sort_rows); returns how many rows fell back."""
    b, lq = q.shape[:2]
    lk = k.shape[1]
    off = lk - lq
    dev = q.device
    n_rows = lq - start
    cap = 2 * kk
    j = -(-3 * kk // (2 * sub_stride))  # ~1.5 k of the row's keys lie above the j-th best of the subsample
    n_sub_all = -(-lk // sub_stride)  # keys 0, s, 2s, ... read in place by the score kernel
    marks = StageClock(STATS, dev)
    marks.mark()
    tau = torch.empty(b, lq, dtype=torch.float32, device=dev)
    chunk = max(64, (max_chunk_elems // max(1, b * n_sub_all)) // 64 * 64)
    buf = torch.empty(b * min(chunk, n_rows) * n_sub_all, dtype=torch.float32, device=dev)
    for s0 in range(start, lq, chunk):
        rows = min(chunk, lq - s0)
        n_sub = min(n_sub_all, (s0 + rows - 1 + off) // sub_stride + 1)
        s = buf[: b * rows * n_sub].view(b, rows, n_sub)
        index_scores(q, k, w, s0, rows, n_sub, off, s, key_stride=sub_stride, k_scale=k_scale)
        tau[:, s0:s0 + rows] = torch.topk(s, min(j, n_sub), dim=-1, sorted=False).values.amin(-1)
    del buf
    few = (torch.arange(lq, device=dev) + off + 1) <= cap  # rows with at most 2k candidates keep all
    tau[:, few] = float("-inf")
    marks.mark("threshold")
    cnt = torch.zeros(b, 2, lq, dtype=torch.int32, device=dev)  # [:, 0] above the threshold, [:, 1] equal
    # candidate lists for a bounded block of rows at a time (fp32 score + int32 key per slot): at 128K tokens
    # all rows' lists at once would take 6.4 GB, more than dense attention's whole forward and backward
    per_row = b * (cap + kk) * 8
    block = max(SELECT_CONFIG["block_m"], SELECT_MEMORY // per_row // 64 * 64)
    rows_now = min(block, n_rows)
    cval_buf = torch.empty(b, rows_now, cap + kk, dtype=torch.float32, device=dev)
    cidx_buf = torch.empty(b, rows_now, cap + kk, dtype=torch.int32, device=dev)
    for r0 in range(start, lq, block):
        r1 = min(lq, r0 + block)
        cval, cidx = cval_buf[:, :r1 - r0].fill_(float("-inf")), cidx_buf[:, :r1 - r0]
        _select_candidates(q, k, w, tau, cnt, cval, cidx, r0, r1, lk, off, cap, kk, k_scale)
        # ties sit below every strictly-greater candidate, so one top-k takes all of those first, then ties
        if FINAL_SELECT == "radix":
            slots = slots_topk32(cval, kk)
        else:
            slots = torch.topk(cval, kk, dim=-1, sorted=False).indices
        picked = torch.gather(cidx, 2, slots.long())
        idx[:, r0:r1] = picked.sort(-1).values if sort_rows else picked  # every slot valid: no row is short
    del cval_buf, cidx_buf
    marks.mark("select")
    marks.finish()
    n_gt, n_eq = cnt[:, 0, start:], cnt[:, 1, start:]
    bad = ((n_gt > cap) | (n_gt + n_eq.clamp(max=kk) < kk)).any(0).nonzero().flatten()
    if bad.numel():
        for r0, r1 in _runs((bad + start).tolist()):
            _chunked_rows(q, k, w, idx, r0, r1, kk, torch.float32, max_chunk_elems, k_scale, sort_rows)
    return int(bad.numel())


FP8_MAX = 448.0  # largest finite float8 e4m3


def quantize_fp8(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor):
    """Index queries and keys to float8 e4m3 with one scale per token (and per head for the queries).

    q [B, Lq, H, d], k [B, Lk, d], w [B, Lq, H] -> (q8, k8, w * q_scale, k_scale [B, Lk] float32). ReLU commutes
    with a positive scale, so the query scales fold into the head weights and the key scale multiplies the
    score: I(t, s) = k_scale[s] * sum_h w'[t, h] ReLU(q8[t, h] . k8[s])."""
    sq = q.float().abs().amax(-1).clamp_min(1e-12) / FP8_MAX
    sk = k.float().abs().amax(-1).clamp_min(1e-12) / FP8_MAX
    q8 = (q.float() / sq[..., None]).to(torch.float8_e4m3fn)
    k8 = (k.float() / sk[..., None]).to(torch.float8_e4m3fn)
    return q8, k8, (w.float() * sq).contiguous(), sk.contiguous()


def indexer_topk(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, topk: int, method: str = "stream",
                 score_dtype: torch.dtype | None = None, max_chunk_elems: int = 1 << 29,
                 sub_stride: int = 16, fp8: bool | None = None, sort_rows: bool = False) -> torch.Tensor:
    """Top-k key indices per query, causal (queries are the last Lq of the Lk positions).

    q [B, Lq, H, d], k [B, Lk, d], w [B, Lq, H] -> idx [B, Lq, min(topk, Lk)] int32 (-1 = empty slot, at row end).
    method: "stream" (default; see the module note) or "chunked". score_dtype (chunked only): storage of the
    scores before selection; default bf16 for bf16/fp16 inputs (radix select, ties within bf16 rounding go to
    the earlier key), else fp32 (`torch.topk`). fp8 (default INDEXER_FP8): score with float8 e4m3 queries and
    keys (`quantize_fp8`, per-token scales; the exact top-k of the quantised scores). sort_rows: every row sorted
    ascending (valid-first still), what `sparse_attention(..., sorted_rows=True)` uses in place of sorted copies.
    """
    if method not in ("stream", "chunked"):
        raise ValueError(f"indexer_topk: method must be 'stream' or 'chunked', got {method!r}")
    if score_dtype is None:
        score_dtype = torch.float32 if q.dtype == torch.float32 else torch.bfloat16
    b, lq, _, _ = q.shape
    lk = k.shape[1]
    off = lk - lq
    kk = min(topk, lk)
    q, k, w = q.contiguous(), k.contiguous(), w.float().contiguous()
    idx = torch.empty(b, lq, kk, dtype=torch.int32, device=q.device)
    k_scale = None
    n_full = max(0, min(lq, kk - off))  # rows t with t + off + 1 <= kk: every candidate is kept
    if n_full:
        slots = torch.arange(kk, device=q.device, dtype=torch.int32)
        lim = torch.arange(n_full, device=q.device, dtype=torch.int32) + off
        idx[:, :n_full] = torch.where(slots[None, :] <= lim[:, None], slots[None, :], -1)
    if n_full == lq:
        return idx
    if INDEXER_FP8 if fp8 is None else fp8:
        q, k, w, k_scale = quantize_fp8(q, k, w)
    if method == "stream":
        STATS["fallback_rows"] = _stream_rows(q, k, w, idx, n_full, kk, sub_stride, max_chunk_elems, k_scale,
                                              sort_rows)
    else:
        _chunked_rows(q, k, w, idx, n_full, lq, kk, score_dtype, max_chunk_elems, k_scale, sort_rows)
    return idx
