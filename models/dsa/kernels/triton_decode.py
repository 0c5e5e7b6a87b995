"""One DSA decode step on the GPU: a new query token per sequence against its cached keys.

1. `decode_select`: the exact top-k of the cached index keys' scores, ties to the earlier key, the rule of the
   prefill path (`indexer_topk`), so a cached decode step selects what a full forward selects. `select: radix`
   (`triton_decode_radix`): a radix select spread over the row, three launches. `select: torch`: one Triton pass
   writes each score as an int64 sort key (the score's order-preserving bits above the inverted key position)
   and `torch.topk` takes the largest (optionally in `segments` pieces first).
2. `decode_attention`: the selected K/V rows split into `n_split` slices (flash-decoding), each slice a
   program per (slice, KV head, sequence) that serves all query heads of the group; the partial softmaxes are
   merged by their log-sum-exp (`_merge_kernel`).
Shapes: q [B, Hq, 1, D], k/v cache [B, Hkv, L, D] (transformers layout), index q [B, 1, H_I, d_I], index keys
[B, L, d_I], weights [B, 1, H_I] -> out [B, 1, Hq, D].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import LOG2E, _decode_keys, _decode_query
from .triton_decode_radix import radix_decode_select
from .triton_sparse_attention import _block_h, _sparse_fwd_kernel

# select: "radix" or "torch" (module docstring); segments: pieces the torch top-k of one long row is cut into
# (`_topk_keys`); both measured by bench/bench_dsa.py
DECODE_CONFIG = {"block_n": 128, "slots_per_split": 128, "segments": 1, "select": "torch"}
_LOW = (1 << 32) - 1


@triton.jit
def _decode_score_kernel(Q, K, W, KEYS, sq_b, sq_h, sk_b, sk_l, sw_b, skey_b, n_keys,
                         H: tl.constexpr, HP: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
                         IEEE: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols = pid * BN + tl.arange(0, BN)
    inb = cols < n_keys
    q, w = _decode_query(Q, W, b, sq_b, sq_h, sw_b, H, HP, D)
    ordered = _decode_keys(q, w, K, b, sk_b, sk_l, cols, inb, D, IEEE)
    key = (ordered.to(tl.int64) << 32) | (0xFFFFFFFF - cols.to(tl.int64))
    tl.store(KEYS + b * skey_b + cols, key, mask=inb)


def decode_select(qi: torch.Tensor, ki: torch.Tensor, wi: torch.Tensor, topk: int) -> torch.Tensor:
    """qi [B, 1, H_I, d_I], ki [B, L, d_I], wi [B, 1, H_I] -> idx [B, 1, min(topk, L)] int32, every slot valid."""
    b, _, h, d = qi.shape
    n_keys = ki.shape[1]
    kk = min(topk, n_keys)
    if kk == n_keys:
        return torch.arange(n_keys, device=qi.device, dtype=torch.int32).expand(b, 1, n_keys).contiguous()
    qi, ki, wi = qi.contiguous(), ki.contiguous(), wi.float().contiguous()
    if DECODE_CONFIG["select"] == "radix":
        return radix_decode_select(qi, ki, wi, kk)
    if DECODE_CONFIG["select"] != "torch":
        raise ValueError(f"DECODE_CONFIG['select'] must be 'radix' or 'torch', got {DECODE_CONFIG['select']!r}")
    keys = torch.empty(b, n_keys, dtype=torch.int64, device=qi.device)
    bn = DECODE_CONFIG["block_n"]
    _decode_score_kernel[(triton.cdiv(n_keys, bn), b)](
        qi, ki, wi, keys, qi.stride(0), qi.stride(2), ki.stride(0), ki.stride(1), wi.stride(0), keys.stride(0),
        n_keys, H=h, HP=max(16, triton.next_power_of_2(h)), D=d, BN=bn, IEEE=qi.dtype == torch.float32)
    top = _topk_keys(keys, kk, DECODE_CONFIG["segments"])
    return (_LOW - (top & _LOW)).to(torch.int32)[:, None, :]


def _topk_keys(keys: torch.Tensor, kk: int, segments: int) -> torch.Tensor:
    """The kk largest of each row of keys [B, L] (distinct int64). With segments > 1 the row is cut into that many
    pieces, each piece's top kk (or all of it) taken in parallel, then the top kk of those: the same set, since
    every global top-kk key is in its piece's top kk; more parallel work for one long row (batch-1 decode)."""
    b, n = keys.shape
    seg_len = -(-n // max(1, segments))
    if segments <= 1 or seg_len <= kk:
        return keys.topk(kk, dim=-1, sorted=False).values
    pad = seg_len * segments - n
    if pad:
        keys = torch.cat([keys, keys.new_full((b, pad), torch.iinfo(torch.int64).min)], dim=1)
    part = keys.view(b, segments, seg_len).topk(kk, dim=-1, sorted=False).values
    return part.reshape(b, segments * kk).topk(kk, dim=-1, sorted=False).values


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, scale: float,
                     slots_per_split: int | None = None) -> torch.Tensor:
    """q [B, Hq, 1, D], k/v [B, Hkv, L, D], idx [B, 1, K] int32 (all valid) -> out [B, 1, Hq, D] (q dtype)."""
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    kk = idx.shape[-1]
    per = slots_per_split or DECODE_CONFIG["slots_per_split"]
    n_split = triton.cdiv(kk, per)
    if kk == n_split * per:  # whole slices: the index rows as they are
        slices = idx.reshape(b, n_split, per)
    else:
        slices = torch.full((b, n_split * per), -1, dtype=torch.int32, device=q.device)
        slices[:, :kk] = idx[:, 0]
        slices = slices.view(b, n_split, per)
    qt = q.transpose(1, 2)  # [B, 1, Hq, D]; the slice "rows" all read this one query (row stride 0)
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)
    part = torch.empty(b, n_split, hq, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, n_split, hq, dtype=torch.float32, device=q.device)
    _sparse_fwd_kernel[(n_split, hkv, b)](
        qt, kt, vt, slices, slices, part, lse, scale * LOG2E,
        qt.stride(0), 0, qt.stride(2), kt.stride(0), kt.stride(1), kt.stride(2),
        vt.stride(0), vt.stride(1), vt.stride(2), slices.stride(0), slices.stride(1), 0,
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1), per, -1,
        G=g, BH=_block_h(g), D=d, BK=min(per, 128), IEEE=q.dtype == torch.float32, HAS_COUNT=False,
        HAS_INIT=False, num_warps=4, num_stages=2)
    out = torch.empty(b, 1, hq, d, dtype=q.dtype, device=q.device)
    _merge_kernel[(hq, b)](part, lse, out, part.stride(0), part.stride(1), part.stride(2), lse.stride(0),
                           lse.stride(1), out.stride(0), out.stride(2), n_split,
                           SP=max(2, triton.next_power_of_2(n_split)), D=d, num_warps=4)
    return out


@triton.jit
def _merge_kernel(PART, LSE, OUT, sp_b, sp_s, sp_h, sl_b, sl_s, so_b, so_h, n_split,
                  SP: tl.constexpr, D: tl.constexpr):
    """out[b, 0, h] = sum_s w_s part[b, s, h] with w = softmax over the slices of their log-sum-exp (base-2
    units; +inf marks an empty slice, which gets no weight). part [B, S, Hq, D] fp32, lse [B, S, Hq]."""
    h = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_s = tl.arange(0, SP)
    offs_d = tl.arange(0, D)
    ms = offs_s < n_split
    lse = tl.load(LSE + b * sl_b + offs_s * sl_s + h, mask=ms, other=float("-inf"))
    lse = tl.where(lse == float("inf"), float("-inf"), lse)
    top = tl.max(lse, 0)
    w = tl.where(lse == float("-inf"), 0.0, tl.exp2(lse - top))
    part = tl.load(PART + b * sp_b + offs_s[:, None] * sp_s + h * sp_h + offs_d[None, :], mask=ms[:, None],
                   other=0.0)
    out = tl.sum(w[:, None] * part, 0) / tl.sum(w, 0)
    tl.store(OUT + b * so_b + h * so_h + offs_d, out.to(OUT.dtype.element_ty))


def decode_step(q, k, v, qi, ki, wi, topk: int, scale: float) -> torch.Tensor:
    """The whole DSA decode step (module docstring): -> out [B, 1, Hq, D]."""
    return decode_attention(q, k, v, decode_select(qi, ki, wi, topk), scale)
