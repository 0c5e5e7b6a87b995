"""PyTorch reference of the DSA pieces (CPU path, and the ground truth the GPU kernels are checked against)."""

from __future__ import annotations

import torch

from .indexer import indexer_scores_ref, topk_indices_ref


def allowed_mask(attention_mask: torch.Tensor | None, batch: int, q_len: int, k_len: int,
                 device: torch.device) -> torch.Tensor:
    """Which keys each query may see: [B, Lq, Lk] bool.

    attention_mask: None (plain causal, queries are the last Lq of Lk positions), a 2-D key padding mask [B, Lk]
    (1 = real token; causal added), or the 4-D mask transformers builds ([B, 1, Lq, Lk]; bool True = allowed, or
    additive float with 0 = allowed).
    """
    offset = k_len - q_len
    causal = (torch.arange(k_len, device=device)[None, :]
              <= torch.arange(q_len, device=device)[:, None] + offset)
    if attention_mask is None:
        return causal[None].expand(batch, q_len, k_len)
    if attention_mask.dim() == 2:
        keys = attention_mask[:, -k_len:].to(device=device).bool()
        return causal[None] & keys[:, None, :]
    if attention_mask.dim() == 4:
        m = attention_mask[:, 0, :, -k_len:].to(device)
        ok = m if m.dtype == torch.bool else (m == 0)
        return ok.expand(batch, q_len, k_len)
    raise ValueError(f"attention_mask must be 2-D or 4-D, got shape {tuple(attention_mask.shape)}")


def gather_kv(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, Hkv, Lk, D], idx [B, Lq, K] (>= 0) -> [B, Hkv, Lq, K, D]."""
    return torch.stack([x[b][:, idx[b]] for b in range(x.shape[0])])


def sparse_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, scaling: float,
                         return_probs: bool = False):
    """Attention of each query over only its selected keys, shared by all heads of every GQA group.

    q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D], idx [B, Lq, K] (-1 = empty slot) ->
    out [B, Lq, Hq, D] (and probs [B, Hq, Lq, K] over the slots if asked). A query with no valid slot outputs 0.
    """
    b, hq, lq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    valid = idx >= 0
    safe = idx.clamp(min=0)
    kg, vg = gather_kv(k, safe), gather_kv(v, safe)  # [B, Hkv, Lq, K, D]
    qg = q.view(b, hkv, g, lq, d)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.einsum("bhgqd,bhqkd->bhgqk", qg.to(acc), kg.to(acc)) * scaling
    s = s.masked_fill(~valid[:, None, None], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhgqk,bhqkd->bhgqd", p, vg.to(acc)).reshape(b, hq, lq, d)
    out = out.transpose(1, 2).to(q.dtype)
    if return_probs:
        return out, p.reshape(b, hq, lq, -1)
    return out


def dense_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                        scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain masked attention for checks and for the warm-up target: -> out [B, Lq, Hq, D], probs [B, Hq, Lq, Lk]."""
    b, hq, lq, d = q.shape
    g = hq // k.shape[1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    kk = k.repeat_interleave(g, dim=1).to(acc)
    vv = v.repeat_interleave(g, dim=1).to(acc)
    s = torch.einsum("bhqd,bhkd->bhqk", q.to(acc), kk) * scaling
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhqk,bhkd->bhqd", p, vv).transpose(1, 2).to(q.dtype)
    return out, p


def dsa_reference(q, k, v, qi, ki, wi, topk: int, scaling: float, attention_mask=None):
    """Whole DSA layer core on the reference path: indexer scores -> top-k -> sparse attention.

    q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D], qi [B, Lq, H_I, d_I], ki [B, Lk, d_I], wi [B, Lq, H_I]
    -> out [B, Lq, Hq, D], idx [B, Lq, K], scores [B, Lq, Lk], allowed [B, Lq, Lk].
    """
    b, _, lq, _ = q.shape
    allowed = allowed_mask(attention_mask, b, lq, k.shape[2], q.device)
    scores = indexer_scores_ref(qi, ki, wi)
    idx = topk_indices_ref(scores, allowed, topk)
    return sparse_attention_ref(q, k, v, idx, scaling), idx, scores, allowed
