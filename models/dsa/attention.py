"""The DSA attention layer: a mixin that replaces the forward of a Qwen3 / Qwen3-MoE / Qwen3-VL-MoE attention.

Projections, q/k norms, rotary embedding and the KV cache are the model's own; only the core changes:
the lightning indexer scores every cached key for each query, the top-k set is chosen once per query token and
shared by every head of every GQA group, and attention runs over that set. The index keys are cached next to the
model's KV cache (one tensor per layer on the cache object), so decode steps select among all cached keys.

Per-module state (plain attributes, set by `attach_dsa` and `models.dsa.training`):
    dsa_config: DSAConfig            dsa_mode: "sparse" | "dense"
    dsa_loss_mode: None | "dense_warmup" | "sparse"   (compute the indexer KL while running forward)
    dsa_last_loss / dsa_last_metrics: what the last forward computed for that loss
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import kernels
from .indexer import indexer_scores_ref, rotate_half, topk_indices_ref
from .reference import allowed_mask, gather_kv, sparse_attention_ref

_CACHE_ATTR = "_dsa_index_keys"


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """The Qwen3 rotary embedding (q/k [B, H, L, D], cos/sin [B, L, D]), same formula as transformers."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def update_index_cache(past_key_values, layer_idx: int, k_index: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Append this step's index keys ([B, L, d_I]) to the per-layer store kept on the cache object; -> all of them.

    The store must stay as long as the model's KV cache for that layer: a mismatch means a cache DSA cannot follow
    (static/sliding caches, cache cropping or beam reordering), and is an error rather than silent misuse.
    """
    store = getattr(past_key_values, _CACHE_ATTR, None)
    if store is None:
        store = {}
        setattr(past_key_values, _CACHE_ATTR, store)
    prev = store.get(layer_idx)
    full = k_index if prev is None else torch.cat([prev, k_index], dim=1)
    if full.shape[1] != kv_len:
        raise RuntimeError(
            f"DSA layer {layer_idx}: {full.shape[1]} cached index keys for {kv_len} cached keys; DSA supports "
            f"DynamicCache-style caches that grow by appending (got {type(past_key_values).__name__})")
    store[layer_idx] = full
    return full


def _use_kernels(module, q: torch.Tensor, attention_mask) -> bool:
    mode = module.dsa_config.use_kernels
    if mode == "never" or not q.is_cuda:
        return False
    if attention_mask is not None:
        return False  # padding / packed masks take the reference path
    ok = kernels.available()
    if mode == "always" and not ok:
        raise RuntimeError("dsa.use_kernels='always' but Triton/CUDA kernels are unavailable")
    return ok


def _needs_backward(*tensors: torch.Tensor) -> bool:
    """A backward will follow this attention (training): worth sorting the index rows for it."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _kl(target: torch.Tensor, logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-query KL(target || softmax(logits)) over the `valid` slots; target rows sum to 1. -> [B, Lq]."""
    logits = logits.masked_fill(~valid, float("-inf"))
    logp = torch.log_softmax(logits, dim=-1)
    t = target.masked_fill(~valid, 0.0)
    term = torch.where(t > 0, t * (torch.log(t.clamp_min(1e-30)) - logp), torch.zeros_like(t))
    return term.sum(-1)


def _mean_over_queries(kl: torch.Tensor, has_keys: torch.Tensor) -> torch.Tensor:
    return (kl * has_keys).sum() / has_keys.sum().clamp_min(1)


class DSAAttentionMixin:
    """Put first in the bases of a Qwen3-family attention class; `attach_dsa` builds those classes."""

    dsa_eager: Callable  # the family's eager_attention_forward (dense path through the model's interface)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None, past_key_values=None, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_norm(self.q_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
        k = self.k_norm(self.k_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rope(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)

        # the indexer never sends gradient into the main model: its input is detached
        qi, ki, wi = self.indexer(hidden_states.detach(), cos, sin)
        if past_key_values is not None:
            ki = update_index_cache(past_key_values, self.layer_idx, ki, k.shape[2])

        cfg = self.dsa_config
        loss_mode = getattr(self, "dsa_loss_mode", None)
        b, _, lq, _ = q.shape
        lk = k.shape[2]
        dense = self.dsa_mode == "dense" or (cfg.dense_when_short and lk <= cfg.topk and loss_mode is None)
        if dense:
            interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self.dsa_eager)
            extra = {"sliding_window": self.sliding_window} if getattr(self, "sliding_window", None) else {}
            out, _ = interface(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **extra, **kwargs)
            if loss_mode is not None:
                self._dense_warmup_loss(q, k, qi, ki, wi, attention_mask)
        elif _use_kernels(self, q, attention_mask):
            if loss_mode is None:
                out = self._kernel_forward(q, k, v, qi, ki, wi)
            else:  # the indexer's loss needs every query's top-k
                train = _needs_backward(q, k, v)
                idx = kernels.indexer_topk(qi, ki, wi, cfg.topk, sort_rows=train)
                out = kernels.sparse_attention(q, k, v, idx, self.scaling, causal_offset=lk - lq, sorted_rows=train)
                self._sparse_loss(q, k, qi, ki, wi, idx.long(), None)
        else:
            allowed = allowed_mask(attention_mask, b, lq, lk, q.device)
            with torch.no_grad():
                idx = topk_indices_ref(indexer_scores_ref(qi, ki, wi), allowed, cfg.topk)
            out = sparse_attention_ref(q, k, v, idx, self.scaling)
            if loss_mode is not None:
                self._sparse_loss(q, k, qi, ki, wi, idx, allowed)
        out = out.reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), None

    def _kernel_forward(self, q, k, v, qi, ki, wi) -> torch.Tensor:
        """CUDA kernels, no indexer loss: queries at positions below `dense_below` dense (SDPA, flash/cuDNN), the
        rest top-k; one new token (lq = 1) through the decode kernel. q [B, Hq, Lq, D] -> [B, Lq, Hq, D]."""
        cfg = self.dsa_config
        lq, lk = q.shape[2], k.shape[2]
        off = lk - lq  # query i sits at position off + i
        below = kernels.DENSE_CROSSOVER if cfg.dense_below == "auto" else cfg.dense_below
        n_dense = min(lq, max(0, below - off))
        parts = []
        if n_dense:
            from torch.nn.attention.bias import causal_lower_right

            keys = off + n_dense
            mask = causal_lower_right(n_dense, keys) if n_dense > 1 else None
            dense = torch.nn.functional.scaled_dot_product_attention(
                q[:, :, :n_dense], k[:, :, :keys], v[:, :, :keys], attn_mask=mask, scale=self.scaling,
                enable_gqa=True)
            parts.append(dense.transpose(1, 2))
        if n_dense < lq:
            qs, qis, wis = q[:, :, n_dense:], qi[:, n_dense:], wi[:, n_dense:]
            if lq - n_dense == 1:
                parts.append(kernels.decode_step(qs, k, v, qis, ki, wis, cfg.topk, self.scaling))
            else:
                train = _needs_backward(q, k, v)  # sorted rows: the backward reads them in place
                idx = kernels.indexer_topk(qis, ki, wis, cfg.topk, sort_rows=train)
                parts.append(kernels.sparse_attention(qs, k, v, idx, self.scaling,
                                                      causal_offset=lk - (lq - n_dense), sorted_rows=train))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    # -- indexer objectives -------------------------------------------------------------------------------------
    def _dense_warmup_loss(self, q, k, qi, ki, wi, attention_mask) -> None:
        """KL(sum-over-heads attention distribution || softmax of index scores) over all allowed past keys."""
        b, hq, lq, _ = q.shape
        lk = k.shape[2]
        allowed = allowed_mask(attention_mask, b, lq, lk, q.device)
        with torch.no_grad():
            g = hq // k.shape[1]
            s = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.repeat_interleave(g, 1).float()) * self.scaling
            p = torch.softmax(s.masked_fill(~allowed[:, None], float("-inf")), -1).nan_to_num(0.0)
            target = p.sum(1)
            target = target / target.sum(-1, keepdim=True).clamp_min(1e-30)
        logits = indexer_scores_ref(qi, ki, wi)
        has = allowed.any(-1).float()
        loss = _mean_over_queries(_kl(target, logits, allowed), has)
        with torch.no_grad():
            kk = min(self.dsa_config.topk, lk)
            top = logits.masked_fill(~allowed, float("-inf")).topk(kk, -1).indices
            mass = (torch.gather(target, -1, top).sum(-1) * has).sum() / has.sum().clamp_min(1)
        self.dsa_last_loss = loss
        self.dsa_last_metrics = {"indexer_kl": loss.detach(), "topk_attention_mass": mass}

    def _sparse_loss(self, q, k, qi, ki, wi, idx, allowed) -> None:
        """KL restricted to the selected set: target = sparse attention probs summed over heads (detached)."""
        valid = idx >= 0
        safe = idx.clamp(min=0)
        with torch.no_grad():
            b, hq, lq, d = q.shape
            hkv = k.shape[1]
            kg = gather_kv(k, safe).float()  # [B, Hkv, Lq, K, D]
            s = torch.einsum("bhgqd,bhqkd->bhgqk", q.view(b, hkv, hq // hkv, lq, d).float(), kg) * self.scaling
            p = torch.softmax(s.masked_fill(~valid[:, None, None], float("-inf")), -1).nan_to_num(0.0)
            target = p.sum((1, 2))
            target = target / target.sum(-1, keepdim=True).clamp_min(1e-30)
        kig = torch.stack([ki[i][safe[i]] for i in range(ki.shape[0])])  # [B, Lq, K, d_I]
        sc = torch.einsum("bqhd,bqkd->bqhk", qi.float(), kig.float()).relu()
        logits = torch.einsum("bqhk,bqh->bqk", sc, wi.float())
        has = valid.any(-1).float()
        loss = _mean_over_queries(_kl(target, logits, valid), has)
        self.dsa_last_loss = loss
        self.dsa_last_metrics = {"indexer_kl": loss.detach()}

