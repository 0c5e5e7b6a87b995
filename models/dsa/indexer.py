"""Lightning indexer: a small scorer that picks, for every query token, the past tokens worth attending to.

Score (DeepSeek-V3.2 form, one shared index key as in MQA):
    I(t, s) = sum_j w(t, j) * ReLU(q_I(t, j) . k_I(s)),   s <= t
with H_I index heads of size d_I for the query, a single index key, per-head weights from the query token.
The 1/sqrt(H_I * d_I) scale is folded into w (ReLU commutes with positive scaling).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[..., 2r] -> [..., 2r] with halves (a, b) -> (-b, a); the rotary layout used by Qwen3."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def slice_rope(cos: torch.Tensor, sin: torch.Tensor, rope_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Take the `rope_dim` highest-frequency slots out of the model's cos/sin ([B, L, head_dim], halves repeated).

    Reusing the model's own tables keeps the indexer on the same positions as the attention (M-RoPE included).
    """
    head_dim = cos.shape[-1]
    half, r2 = head_dim // 2, rope_dim // 2
    if r2 > half:
        raise ValueError(f"dsa.rope_dim={rope_dim} exceeds the model head_dim={head_dim}")
    cos_r = torch.cat((cos[..., :r2], cos[..., half : half + r2]), dim=-1)
    sin_r = torch.cat((sin[..., :r2], sin[..., half : half + r2]), dim=-1)
    return cos_r, sin_r


class LightningIndexer(nn.Module):
    """Projections of the indexer; `forward` gives the pieces the score needs (scores themselves are elsewhere)."""

    def __init__(self, hidden_size: int, index_heads: int, index_head_dim: int, rope_dim: int,
                 init_std: float = 0.02) -> None:
        super().__init__()
        self.index_heads = index_heads
        self.index_head_dim = index_head_dim
        self.rope_dim = rope_dim
        self.wq = nn.Linear(hidden_size, index_heads * index_head_dim, bias=False)
        self.wk = nn.Linear(hidden_size, index_head_dim, bias=False)
        self.k_norm = nn.LayerNorm(index_head_dim)
        self.weights_proj = nn.Linear(hidden_size, index_heads, bias=False)
        for lin in (self.wq, self.wk, self.weights_proj):
            nn.init.normal_(lin.weight, std=init_std)
        self.scale = 1.0 / math.sqrt(index_heads * index_head_dim)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        r = self.rope_dim
        if r == 0:
            return x
        xr, xp = x[..., :r], x[..., r:]
        xr = xr * cos + rotate_half(xr) * sin
        return torch.cat((xr, xp), dim=-1)

    def forward(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden_states [B, L, hidden], cos/sin [B, L, head_dim] (model tables) ->
        q [B, L, H_I, d_I], k [B, L, d_I], w [B, L, H_I] (float32, scale folded in)."""
        b, n, _ = hidden_states.shape
        q = self.wq(hidden_states).view(b, n, self.index_heads, self.index_head_dim)
        k = self.k_norm(self.wk(hidden_states))
        if self.rope_dim:
            cos_r, sin_r = slice_rope(cos, sin, self.rope_dim)
            cos_r, sin_r = cos_r.to(q.dtype), sin_r.to(q.dtype)
            q = self._rope(q, cos_r[:, :, None, :], sin_r[:, :, None, :])
            k = self._rope(k, cos_r, sin_r)
        w = self.weights_proj(hidden_states).float() * self.scale
        return q, k, w


def indexer_scores_ref(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Reference scores: q [B, Lq, H, d], k [B, Lk, d], w [B, Lq, H] -> [B, Lq, Lk] (float32 or float64)."""
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.einsum("bqhd,bkd->bqhk", q.to(dt), k.to(dt)).relu()
    return torch.einsum("bqhk,bqh->bqk", s, w.to(dt))


def topk_indices_ref(scores: torch.Tensor, allowed: torch.Tensor, topk: int) -> torch.Tensor:
    """Top-k keys per query among the allowed ones.

    scores [B, Lq, Lk], allowed [B, Lq, Lk] bool -> idx [B, Lq, min(topk, Lk)] int64, -1 where a query has fewer
    allowed keys than slots (so a short sequence selects exactly its causal set: dense attention).
    """
    kk = min(topk, scores.shape[-1])
    masked = scores.masked_fill(~allowed, float("-inf"))
    # a stable sort breaks exact ties (ReLU makes many scores exactly 0) towards the earlier key, so the choice
    # does not depend on the row length: a cached decode step picks what a full forward picks
    vals, idx = torch.sort(masked, dim=-1, descending=True, stable=True)
    vals, idx = vals[..., :kk], idx[..., :kk]
    return idx.masked_fill(vals == float("-inf"), -1)
