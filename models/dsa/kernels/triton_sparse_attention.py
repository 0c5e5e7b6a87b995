"""Sparse GQA attention over selected key indices: Triton forward and backward, bf16 I/O, fp32 accumulation.

One program per (query token, KV head, batch): it gathers the selected K/V rows once and uses them for all the
query heads of that GQA group (8 for Qwen3-30B-A3B), so each gathered row feeds 8 heads. The softmax is the
streaming (online) one; the forward saves the log-sum-exp (base 2) for the backward, which recomputes the
probabilities, computes dQ per query and adds dK/dV into fp32 buffers with atomics (rows selected by many
queries). At long context the backward runs in passes over key ranges (index rows sorted and cut into segments,
`key_range_segments`) so that the atomics land on accumulators that stay in L2 (docs/dsa.md, roofline).
Index rows are "valid-first" when `causal_offset` is given: slots past min(K, t + causal_offset + 1) are skipped.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .tile_split import TileSplit, split_tiles
from .triton_common import LOG2E, _dot, _softmax_step
from .triton_shared_attention import shared_attention_bwd, shared_attention_fwd

# launch settings (block of gathered keys, warps, pipeline depth); chosen from the sweep in bench/bench_dsa.py
# under the constraint of no register spills (checked with cuobjdump -res-usage on sm_90 builds)
FWD_CONFIG = {"block_k": 128, "num_warps": 4, "num_stages": 2}
# key_range: keys per backward pass (0 = one pass over all keys); dq_rows: query rows whose fp32 dQ accumulator
# is held at once (0 = all); see sparse_attention_bwd
BWD_CONFIG = {"block_k": 32, "num_warps": 4, "num_stages": 2, "key_range": 16384, "dq_rows": 16384}


@triton.jit
def _sparse_fwd_kernel(Q, K, V, IDX, CNT, Out, LSE, qk_scale,
                       sq_b, sq_l, sq_h, sk_b, sk_l, sk_h, sv_b, sv_l, sv_h,
                       si_b, si_l, sc_b, so_b, so_l, so_h, sl_b, sl_l,
                       KK, causal_offset,
                       G: tl.constexpr, BH: tl.constexpr, D: tl.constexpr, BK: tl.constexpr,
                       IEEE: tl.constexpr, HAS_COUNT: tl.constexpr, HAS_INIT: tl.constexpr):
    """HAS_COUNT: query t uses slots 0 .. CNT[t] of its row. HAS_INIT: Out/LSE already hold a normalised partial
    result over other keys (the shared-key kernel's; LSE -inf = none), which this program extends."""
    t = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_h = tl.arange(0, BH)
    offs_d = tl.arange(0, D)
    hmask = offs_h < G
    heads = g * G + offs_h
    q = tl.load(Q + b * sq_b + t * sq_l + heads[:, None] * sq_h + offs_d[None, :], mask=hmask[:, None], other=0.0)
    o_ptr = Out + b * so_b + t * so_l + heads[:, None] * so_h + offs_d[None, :]
    l_ptr = LSE + b * sl_b + t * sl_l + heads
    if HAS_INIT:  # state (m, l, acc) = (lse, 1, out) is exactly the partial softmax over the other keys
        m_i = tl.load(l_ptr, mask=hmask, other=float("-inf"))
        l_i = tl.where(m_i > float("-inf"), 1.0, 0.0)
        acc = tl.load(o_ptr, mask=hmask[:, None], other=0.0).to(tl.float32) * l_i[:, None]
    else:
        m_i = tl.full((BH,), float("-inf"), tl.float32)
        l_i = tl.zeros((BH,), tl.float32)
        acc = tl.zeros((BH, D), tl.float32)
    if HAS_COUNT:
        n = tl.load(CNT + b * sc_b + t)
    elif causal_offset >= 0:
        n = tl.minimum(KK, tl.program_id(0) + causal_offset + 1)
    else:
        n = KK
    idx_row = IDX + b * si_b + t * si_l
    kbase = K + b * sk_b + g * sk_h
    vbase = V + b * sv_b + g * sv_h
    for start in range(0, n, BK):
        offs_k = start + tl.arange(0, BK)
        ids = tl.load(idx_row + offs_k, mask=offs_k < n, other=-1)
        valid = ids >= 0
        ids64 = tl.where(valid, ids, 0).to(tl.int64)
        kt = tl.load(kbase + ids64[:, None] * sk_l + offs_d[None, :], mask=valid[:, None], other=0.0)
        vt = tl.load(vbase + ids64[:, None] * sv_l + offs_d[None, :], mask=valid[:, None], other=0.0)
        m_i, l_i, acc = _softmax_step(q, kt, vt, valid[None, :], m_i, l_i, acc, qk_scale, IEEE)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(o_ptr, out.to(Out.dtype.element_ty), mask=hmask[:, None])
    lse = tl.where(l_i > 0, m_i + tl.math.log2(l_safe), float("inf"))
    tl.store(l_ptr, lse, mask=hmask)


@triton.jit
def _sparse_bwd_kernel(Q, K, V, IDX, SEG, DO, LSE, DELTA, DQ, DK, DV, qk_scale, sm_scale,
                       sq_b, sq_l, sq_h, sk_b, sk_l, sk_h, sv_b, sv_l, sv_h,
                       si_b, si_l, sdo_b, sdo_l, sdo_h, sl_b, sl_l,
                       sdq_b, sdq_l, sdq_h, sdk_b, sdk_l, sdk_h, sg_b, sg_l,
                       t0, p, dq_row0,
                       G: tl.constexpr, BH: tl.constexpr, D: tl.constexpr, BK: tl.constexpr,
                       IEEE: tl.constexpr, ACC_DQ: tl.constexpr):
    """Slots SEG[t, p] .. SEG[t, p + 1] of query t = t0 + program's index row (those whose key lies in key range
    p): dQ of the query (stored, or added to an fp32 buffer when ACC_DQ; DQ holds rows dq_row0 on), dK/dV rows by
    fp32 atomics."""
    t = (t0 + tl.program_id(0)).to(tl.int64)
    g = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    seg = SEG + b * sg_b + t * sg_l + p
    lo = tl.load(seg)
    hi = tl.load(seg + 1)
    offs_h = tl.arange(0, BH)
    offs_d = tl.arange(0, D)
    hmask = offs_h < G
    heads = g * G + offs_h
    dq = tl.zeros((BH, D), tl.float32)
    if hi > lo:
        q = tl.load(Q + b * sq_b + t * sq_l + heads[:, None] * sq_h + offs_d[None, :], mask=hmask[:, None],
                    other=0.0)
        do = tl.load(DO + b * sdo_b + t * sdo_l + heads[:, None] * sdo_h + offs_d[None, :], mask=hmask[:, None],
                     other=0.0)
        lse = tl.load(LSE + b * sl_b + t * sl_l + heads, mask=hmask, other=float("inf"))
        delta = tl.load(DELTA + b * sl_b + t * sl_l + heads, mask=hmask, other=0.0)
        idx_row = IDX + b * si_b + t * si_l
        kbase = K + b * sk_b + g * sk_h
        vbase = V + b * sv_b + g * sv_h
        dkbase = DK + b * sdk_b + g * sdk_h
        dvbase = DV + b * sdk_b + g * sdk_h
        for start in range(lo, hi, BK):
            offs_k = start + tl.arange(0, BK)
            ids = tl.load(idx_row + offs_k, mask=offs_k < hi, other=-1)
            valid = ids >= 0
            ids64 = tl.where(valid, ids, 0).to(tl.int64)
            kt = tl.load(kbase + ids64[:, None] * sk_l + offs_d[None, :], mask=valid[:, None], other=0.0)
            vt = tl.load(vbase + ids64[:, None] * sv_l + offs_d[None, :], mask=valid[:, None], other=0.0)
            s = _dot(q, tl.trans(kt), IEEE) * qk_scale
            pr = tl.math.exp2(s - lse[:, None])
            pr = tl.where(valid[None, :] & hmask[:, None], pr, 0.0)
            dp = _dot(do, tl.trans(vt), IEEE)
            ds = pr * (dp - delta[:, None])
            dq += _dot(ds.to(kt.dtype), kt, IEEE)
            dk_c = _dot(tl.trans(ds.to(q.dtype)), q, IEEE) * sm_scale
            dv_c = _dot(tl.trans(pr.to(do.dtype)), do, IEEE)
            tl.atomic_add(dkbase + ids64[:, None] * sdk_l + offs_d[None, :], dk_c, mask=valid[:, None],
                          sem="relaxed")
            tl.atomic_add(dvbase + ids64[:, None] * sdk_l + offs_d[None, :], dv_c, mask=valid[:, None],
                          sem="relaxed")
    dq_ptr = DQ + b * sdq_b + (t - dq_row0) * sdq_l + heads[:, None] * sdq_h + offs_d[None, :]
    if ACC_DQ:
        if hi > lo:
            tl.store(dq_ptr, tl.load(dq_ptr, mask=hmask[:, None], other=0.0) + dq * sm_scale, mask=hmask[:, None])
    else:
        tl.store(dq_ptr, (dq * sm_scale).to(DQ.dtype.element_ty), mask=hmask[:, None])


def _block_h(g: int) -> int:
    return max(16, triton.next_power_of_2(g))


def sparse_attention_fwd(q, k, v, idx, scale: float, causal_offset: int = -1, config: dict | None = None,
                         split: TileSplit | None = None):
    """q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D] (any strides, D contiguous), idx [B, Lq, K] int32
    -> out [B, Lq, Hq, D] (q dtype), lse [B, Lq, Hq] float32 (base 2; +inf for a query with no key).
    With `split` (the tiles' shared keys of the same selection, `tile_split.split_tiles(idx)`), the shared keys go
    through the tile kernel first and this kernel adds each query's private keys (idx is then unused)."""
    cfg = {**FWD_CONFIG, **(config or {})}
    b, lq, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    out = torch.empty(b, lq, hq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, lq, hq, dtype=torch.float32, device=q.device)
    counts = idx  # placeholder pointer when there are no counts
    if split is not None:
        shared_attention_fwd(q, k, v, split, scale, out, lse)
        idx, counts = split.private_idx, split.private_count
    grid = (lq, hkv, b)
    _sparse_fwd_kernel[grid](q, k, v, idx, counts, out, lse, scale * LOG2E,
                             q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                             v.stride(0), v.stride(1), v.stride(2), idx.stride(0), idx.stride(1), counts.stride(0),
                             out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
                             idx.shape[-1], causal_offset,
                             G=g, BH=_block_h(g), D=d, BK=cfg["block_k"], IEEE=q.dtype == torch.float32,
                             HAS_COUNT=split is not None, HAS_INIT=split is not None,
                             num_warps=cfg["num_warps"],
                             num_stages=cfg["num_stages"])
    return out, lse


def key_range_segments(idx: torch.Tensor, lk: int, key_range: int, causal_offset: int = -1,
                       counts: torch.Tensor | None = None, sorted_rows: bool = False):
    """Split every index row by key range for the backward's passes.

    idx [B, Lq, K] int32 -> (rows [B, Lq, K] int32, seg [B, Lq, P + 1] int32, P): pass p handles slots
    seg[..., p] .. seg[..., p + 1] of `rows`, whose keys all lie in [p * key_range, (p + 1) * key_range).
    With one pass (key_range <= 0 or >= lk) the rows are `idx` itself and its slots [0, n) (n as in the forward).
    Rows sorted ascending and valid-first (`sorted_rows`, or `counts` [B, Lq] given: counts[t] keys, e.g. a
    `TileSplit`'s private rows) are used as they are, their segments found a block of rows at a time; otherwise
    the rows are sorted into a copy with empty slots (-1) moved past the last segment."""
    b, lq, kk = idx.shape
    n_pass = 1 if key_range <= 0 else max(1, -(-lk // key_range))
    if n_pass == 1:
        seg = torch.zeros(b, lq, 2, dtype=torch.int32, device=idx.device)
        if counts is not None:
            seg[..., 1] = counts
        elif causal_offset >= 0:
            seg[..., 1] = (torch.arange(lq, device=idx.device, dtype=torch.int32) + causal_offset + 1).clamp(max=kk)
        else:
            seg[..., 1] = kk
        return idx, seg, 1
    big = torch.iinfo(torch.int32).max
    rows = idx if (counts is not None or sorted_rows) else torch.where(idx >= 0, idx, big).sort(dim=-1).values
    bounds = (torch.arange(n_pass + 1, device=idx.device, dtype=torch.int32) * key_range).clamp(max=lk)
    seg = torch.empty(b, lq, n_pass + 1, dtype=torch.int32, device=idx.device)
    step = max(1, (1 << 25) // max(1, b * kk))  # rows per block: a 128 MiB copy at most
    for r0 in range(0, lq, step):
        part = rows[:, r0:r0 + step]
        part = torch.where(part >= 0, part, big)  # empties (at the row ends) past every bound
        seg[:, r0:r0 + step] = torch.searchsorted(part, bounds.expand(b, part.shape[1], n_pass + 1).contiguous(),
                                                  out_int32=True)
    return rows, seg, n_pass


def sparse_attention_bwd(q, k, v, idx, out, lse, dout, scale: float, causal_offset: int = -1,
                         config: dict | None = None, split: TileSplit | None = None, sorted_rows: bool = False):
    """Gradients of `sparse_attention_fwd`: -> dq [B, Lq, Hq, D], dk/dv [B, Lk, Hkv, D] (input dtypes).

    dK/dV are summed with fp32 atomics. Their fp32 accumulators (1 KB per key and KV head) are far larger than L2 at
    long context, so a single pass sends every atomic to DRAM; the work is therefore split into passes over key
    ranges of `key_range` keys (config), each of which only touches accumulators that stay in L2. dQ is then
    summed over the passes in an fp32 buffer (one owner per row and pass: no atomics), held for `dq_rows` rows at
    a time (config). With `split` (as in the forward), the private rows take this path and the tile kernel adds
    the shared keys' gradients. `sorted_rows`: idx's rows are sorted ascending and valid-first, so the passes
    read them in place instead of a sorted copy."""
    cfg = {**BWD_CONFIG, **(config or {})}
    b, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    delta = (dout.float() * out.float()).sum(-1).contiguous()  # [B, Lq, Hq]
    if split is not None:
        rows, seg, n_pass = key_range_segments(split.private_idx, lk, cfg["key_range"], -1, split.private_count)
    else:
        rows, seg, n_pass = key_range_segments(idx, lk, cfg["key_range"], causal_offset, sorted_rows=sorted_rows)
    acc_dq = n_pass > 1 or split is not None
    dk = torch.zeros(b, lk, hkv, d, dtype=torch.float32, device=q.device)
    dv = torch.zeros_like(dk)
    dq = torch.empty(b, lq, hq, d, dtype=q.dtype, device=q.device)

    def launch(t0: int, t1: int, p: int, dq_buf: torch.Tensor, dq_row0: int) -> None:
        _sparse_bwd_kernel[(t1 - t0, hkv, b)](
            q, k, v, rows, seg, dout, lse, delta, dq_buf, dk, dv, scale * LOG2E, scale,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), rows.stride(0), rows.stride(1),
            dout.stride(0), dout.stride(1), dout.stride(2), lse.stride(0), lse.stride(1),
            dq_buf.stride(0), dq_buf.stride(1), dq_buf.stride(2), dk.stride(0), dk.stride(1), dk.stride(2),
            seg.stride(0), seg.stride(1), t0, p, dq_row0,
            G=g, BH=_block_h(g), D=d, BK=cfg["block_k"], IEEE=q.dtype == torch.float32, ACC_DQ=acc_dq,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

    if not acc_dq:  # one pass, no shared keys: each query's dQ is complete in one program
        launch(0, lq, 0, dq, 0)
        return dq, dk.to(k.dtype), dv.to(v.dtype)
    # dQ summed over the passes (and the shared keys) in fp32, for a block of rows at a time: at 128K tokens a
    # buffer for every row would take 2 GiB; every row's terms are added in the same order either way
    block = cfg["dq_rows"] if 0 < cfg["dq_rows"] < lq else lq
    if split is not None:
        block = -(-block // split.block_m) * split.block_m  # whole tiles
    acc = torch.empty(b, min(block, lq), hq, d, dtype=torch.float32, device=q.device)
    for r0 in range(0, lq, block):
        r1 = min(lq, r0 + block)
        dq_blk = acc[:, :r1 - r0].zero_()
        for p in range(n_pass):
            t0 = 0 if (causal_offset < 0 or n_pass == 1) else max(0, p * cfg["key_range"] - causal_offset)
            if max(t0, r0) >= r1:
                break
            launch(max(t0, r0), r1, p, dq_blk, r0)
        if split is not None:
            shared_attention_bwd(q, k, v, split, dout, lse, delta, scale, dq_blk, dk, dv,
                                 tiles=(r0 // split.block_m, -(-r1 // split.block_m)))
        dq[:, r0:r1] = dq_blk
    return dq, dk.to(k.dtype), dv.to(v.dtype)


# Sharing keys within query tiles (`tile_split`): "auto" splits when a backward follows and a probe of
# `probe_tiles` tiles spread over the sequence finds at least `min_fraction` of their (query, key) pairs served by
# shared keys; "on" / "off" always / never. block_m queries per tile, min_share queries that must select a key for
# it to be shared. Measured (H100, docs/dsa.md round 2): the split (torch ops) costs more than the tile kernels
# save in a forward alone at every length, and halves fwd+bwd at 0.76 sharing; 0.34 was even.
SHARE_CONFIG = {"mode": "auto", "block_m": 16, "min_share": 4, "min_fraction": 0.5, "probe_tiles": 64}


def plan_split(idx: torch.Tensor, config: dict | None = None, backward: bool = True,
               sorted_rows: bool = False) -> TileSplit | None:
    """The tile split to use for idx [B, Lq, K] under SHARE_CONFIG (or `config`), or None for the per-query path;
    `backward`: whether a backward pass will reuse it (mode "auto" splits only then); `sorted_rows`: idx's rows
    are sorted ascending and valid-first (the split skips sorting them)."""
    cfg = {**SHARE_CONFIG, **(config or {})}
    if cfg["mode"] == "off" or idx.shape[1] < 2 * cfg["block_m"]:
        return None
    if cfg["mode"] == "auto":
        if not backward:
            return None
        n_tiles = idx.shape[1] // cfg["block_m"]
        picks = torch.linspace(0, n_tiles - 1, min(n_tiles, cfg["probe_tiles"]), device=idx.device).long()
        rows = (picks[:, None] * cfg["block_m"] + torch.arange(cfg["block_m"], device=idx.device)).reshape(-1)
        probe = split_tiles(idx[:1, rows], cfg["block_m"], cfg["min_share"], sorted_rows=sorted_rows)
        if probe.shared_fraction < cfg["min_fraction"]:
            return None
    elif cfg["mode"] != "on":
        raise ValueError(f"SHARE_CONFIG mode must be auto, on or off, got {cfg['mode']!r}")
    return split_tiles(idx, cfg["block_m"], cfg["min_share"], sorted_rows=sorted_rows)


class _SparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, idx, scale, causal_offset, share, sorted_rows):
        split = plan_split(idx, share, backward=any(ctx.needs_input_grad[:3]), sorted_rows=sorted_rows)
        out, lse = sparse_attention_fwd(q, k, v, idx, scale, causal_offset, split=split)
        # with a split the backward reads its lists, not idx ([B, Lq, K] int32: 1 GiB at 128K tokens)
        ctx.save_for_backward(q, k, v, idx if split is None else idx[:, :0], out, lse)
        ctx.scale, ctx.causal_offset, ctx.split, ctx.sorted_rows = scale, causal_offset, split, sorted_rows
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, idx, out, lse = ctx.saved_tensors
        dq, dk, dv = sparse_attention_bwd(q, k, v, idx, out, lse, dout, ctx.scale, ctx.causal_offset,
                                          split=ctx.split, sorted_rows=ctx.sorted_rows)
        ctx.split = None
        return dq, dk, dv, None, None, None, None, None


def _d_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor,
                     scale: float | None = None, causal_offset: int = -1, share: dict | None = None,
                     sorted_rows: bool = False) -> torch.Tensor:
    """Differentiable sparse attention. q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D] (the transformers layout),
    idx [B, Lq, K] (-1 = empty) -> out [B, Lq, Hq, D]. causal_offset >= 0 promises valid-first index rows
    holding at most t + causal_offset + 1 valid slots (what `indexer_topk` produces) so the kernels skip the rest.
    `share` overrides SHARE_CONFIG keys (tile sharing of keys between neighbouring queries; same result).
    `sorted_rows` promises rows sorted ascending and valid-first (`indexer_topk(..., sort_rows=True)`): the tile
    split and the backward use them in place instead of sorting a copy (1 GiB at 128K tokens)."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    idx = idx.to(torch.int32).contiguous()
    qt, kt, vt = (_d_contiguous(x.transpose(1, 2)) for x in (q, k, v))
    return _SparseAttention.apply(qt, kt, vt, idx, float(scale), int(causal_offset), share, bool(sorted_rows))
