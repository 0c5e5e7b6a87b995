"""Log-probs, entropy and top-k ids of softmax(hidden @ weight.T / T) straight from hidden states, without a
`[N, V]` logits tensor in the forward or the backward.

The work walks `[rows, cols]` tiles of the logits. The forward folds each tile into per-row running statistics:
max, sum of exponentials, and the entropy's sum (an fp32 online logsumexp). It also reads the requested ids' logits
and merges the tile's top-k. It keeps only the inputs, the per-row logsumexp (and entropy) and O(N k) per-id values.
The backward recomputes each tile's logits and turns them into the logits gradient:

    d loss / d z = sum_j g_j onehot(ids_j) - p * sum_j g_j  [- g_H p (log p + H) with entropy_grad],  z = logits / T

divided by T. Then grad_hidden += grad @ W[cols] and grad_weight[cols] += grad.T @ hidden[rows]. The
recomputation makes four full-size matmuls where the plain path has three, so 4/3 of its matmul time is a lower
bound. The vocabulary is the outer loop, so each vocabulary slice of grad_weight is summed in fp32 over the row
blocks and rounded once. That takes an fp32 `[cols, H]` buffer, not an fp32 copy of the whole `[V, H]` weight.
grad_hidden is accumulated in an fp32 `[N, H]` buffer (unless hidden is already fp32). The one-hot entries are
written from values computed in fp32, not added to a rounded tile: where p ~ 1, g - p g cancels.

Memory, beyond the inputs and the returned gradients:
- one tile: compiled, a `[rows, cols]` tile in the inputs' dtype, overwritten by its gradient. Eager, that tile plus
  two fp32 temporaries, about 2.5x `TILE_BYTES`;
- in the backward, the fp32 accumulators `[N, H]` (grad_hidden) and `[cols, H]` (one grad_weight slice);
- O(N k) ids and values.
At N = 32768, H = 2048, V = 151936 in bf16 (5464 x 5632 tiles), this comes to 59 MiB (compiled tile) + 256 MiB +
44 MiB + ~20 MiB. The returned grad_weight (0.58 GiB) and grad_hidden (0.125 GiB) come on top.

On CUDA the per-tile elementwise bodies go through `torch.compile`, which fuses them into a few kernels per tile
instead of about eight passes over fp32 tiles. The eager bodies are the reference, and what CPU uses.

Why not `trl.kernels.ChunkedLogProbFunction` or liger-kernel's fused linear cross-entropy: both take one target
id per row, while we need k ids per row from one logsumexp. Neither returns top-k ids. Liger computes its gradient
inside the forward, for a scalar loss, with no entropy gradient. trl's backward imports trl's trainer utilities,
which our GPU image does not install.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

# fp32 bytes of one tile's logits. 32K x 151,936 then runs in 6 x 27 tiles of 5464 x 5632. Each matmul runs at full
# speed, and the compiled backward stays under 1 GiB above the inputs, the returned gradients included.
TILE_BYTES = 128 << 20

# Running max before the first tile: finite, so (old max - new max) * 0 stays 0 instead of NaN.
_NO_MAX = -1e30


class HiddenLogprobs(NamedTuple):
    """logprobs `[N, k]` and entropy `[N]` (float32; float64 for float64 inputs); topk_ids `[N, topk]` or None."""

    logprobs: torch.Tensor
    entropy: torch.Tensor
    topk_ids: torch.Tensor | None


def hidden_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    topk: int = 0,
    entropy_grad: bool = False,
    chunk_rows: int | None = None,
    chunk_vocab: int | None = None,
    compiled: bool | None = None,
) -> HiddenLogprobs:
    """log softmax(hidden @ weight.T / temperature) at `ids`, the entropy per row and the top-`topk` ids per row.

    hidden `[N, H]`, weight `[V, H]` (an lm_head, possibly tied to the input embedding), ids `[N, k]` long in
    [0, V), duplicates allowed. logprobs are differentiable w.r.t. hidden and weight. entropy is differentiable only
    with `entropy_grad` (otherwise it is a logged value, with no gradient). topk_ids never has a gradient; exact ties
    may be broken differently from `torch.topk` on the full row.
    Logits are computed in the inputs' dtype (the autocast dtype under autocast); statistics are kept in fp32.
    `chunk_rows` / `chunk_vocab` override the tile shape, which is otherwise chosen from `TILE_BYTES`. `compiled`:
    run the per-tile bodies through torch.compile (default: on CUDA when Triton is importable). Under `no_grad`,
    or when neither input requires grad, no autograd state is kept.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    if ids.dim() != 2 or ids.shape[0] != hidden.shape[0] or ids.shape[1] < 1:
        raise ValueError(f"ids [N, k >= 1] expected for N = {hidden.shape[0]}, got {tuple(ids.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n, v = hidden.shape[0], weight.shape[0]
    if not 0 <= topk <= v:
        raise ValueError(f"topk must be in [0, {v}], got {topk}")
    dtype = _compute_dtype(hidden, weight)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if n == 0:
        return HiddenLogprobs(hidden.new_zeros(ids.shape, dtype=acc), hidden.new_zeros(0, dtype=acc),
                              ids.new_zeros(0, topk) if topk else None)
    rows, cols = tile_shape(n, v, chunk_rows, chunk_vocab)
    if compiled is None:
        compiled = hidden.is_cuda and importlib.util.find_spec("triton") is not None
    cfg = _Config(1.0 / float(temperature), topk, entropy_grad, rows, cols, dtype, acc, compiled)
    ids = ids.long()
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        logprobs, entropy, top = _HiddenLogprobsFn.apply(hidden, weight, ids, cfg)
    else:
        with torch.no_grad():
            logprobs, entropy, top, _ = _forward(hidden, weight, ids, cfg)
    return HiddenLogprobs(logprobs, entropy, top if topk else None)


def tile_shape(n: int, v: int, rows: int | None = None, cols: int | None = None) -> tuple[int, int]:
    """(rows, vocabulary columns) of a tile with about `TILE_BYTES` of fp32 logits. Near-square tiles keep the
    fp32 accumulators' traffic low: grad_hidden is re-read once per vocabulary slice, a grad_weight slice once per
    row block. Defaults are evened out so that the last tile is not a sliver; given sizes are used as they are."""
    elems = TILE_BYTES // 4
    if rows is None and cols is None:
        side = math.isqrt(elems)
        if n <= side:
            rows = n
        elif v <= side:
            cols = v
        else:
            rows = cols = side
        rows = rows or max(1, elems // cols)
        cols = cols or max(1, elems // rows)
        return _even(n, rows, 8), _even(v, cols, 64)
    rows = rows or max(1, elems // cols)
    cols = cols or max(1, elems // rows)
    return min(rows, n), min(cols, v)


def _even(total: int, most: int, align: int) -> int:
    pieces = -(-total // max(1, min(most, total)))
    size = -(-total // pieces)
    return min(-(-size // align) * align, total)


@dataclass(frozen=True)
class _Config:
    inv_t: float
    topk: int
    entropy_grad: bool
    rows: int
    cols: int
    dtype: torch.dtype  # of the logits matmuls
    acc: torch.dtype  # of the statistics and accumulators
    compiled: bool


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


# --- per-tile bodies (eager reference; compiled on CUDA) ---------------------------------------------------------


def _fold(logits: torch.Tensor, m: torch.Tensor, s: torch.Tensor, xs: torch.Tensor, inv_t: float):
    """Fold a logits tile `[r, c]` into the running per-row max m, sum s = sum exp(z - m) and
    xs = sum exp(z - m) (z - m) (all `[r]`), z = logits * inv_t. Consumes `logits` when it is in m's dtype."""
    z = logits.to(m.dtype)
    if inv_t != 1.0:
        z = z.mul_(inv_t)
    m_new = torch.maximum(m, z.amax(1))
    shifted = z.sub_(m_new.unsqueeze(1))
    e = shifted.exp()
    total = e.sum(1)
    spread = e.mul_(shifted).sum(1)
    drop = m - m_new
    scale = drop.exp()
    # xs was relative to the old max: sum e (z - m_new) = xs + s (m - m_new) before rescaling.
    return m_new, s * scale + total, (xs + s * drop) * scale + spread


def _dense_grad(logits: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor, a: torch.Tensor,
                b: torch.Tensor | None, inv_t: float) -> torch.Tensor:
    """Overwrite a logits tile `[r, c]` with p * (a + b (log p + H)), given row vectors a = -sum_j g_j / T and
    b = -g_H / T (None: no entropy gradient). This is the logits gradient except at the requested ids, which the
    caller writes. Returns `logits`, so compiled on CUDA it is one in-place kernel with no second tile."""
    z = logits.to(lse.dtype)
    if inv_t != 1.0:
        z = z.mul_(inv_t)
    logp = z.sub_(lse.unsqueeze(1))
    if b is None:
        grad = logp.exp_().mul_(a.unsqueeze(1))
    else:
        p = logp.exp()
        grad = logp.add_(entropy.unsqueeze(1)).mul_(b.unsqueeze(1)).add_(a.unsqueeze(1)).mul_(p)
    return logits.copy_(grad)


class _MaybeCompiled:
    """A tile body through torch.compile, falling back to eager (with one warning) where compilation fails."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.compiled: Callable | None = None
        self.failed = False

    def __call__(self, *args):
        if not self.failed:
            try:
                if self.compiled is None:
                    self.compiled = torch.compile(self.fn, dynamic=None)
                return self.compiled(*args)
            except torch.OutOfMemoryError:
                raise
            except Exception as err:  # noqa: BLE001  (no Triton / compiler here: eager still works)
                self.failed = True
                warnings.warn(f"hidden_logprobs: torch.compile of {self.fn.__name__} failed, running eager: {err!r}",
                              stacklevel=2)
        return self.fn(*args)


_COMPILED = {"fold": _MaybeCompiled(_fold), "grad": _MaybeCompiled(_dense_grad)}


def _body(name: str, cfg: _Config) -> Callable:
    return _COMPILED[name] if cfg.compiled else {"fold": _fold, "grad": _dense_grad}[name]


# --- the requested ids, grouped by tile --------------------------------------------------------------------------


def _entries(ids: torch.Tensor, cfg: _Config, v: int):
    """The distinct (row, id) pairs of `ids [N, k]`, sorted by tile. Returns `keys [U]`, with tile =
    keys // (rows * cols) and the in-tile row and column from the remainder; `inverse [N * k]` into keys; and the
    per-tile bounds (a Python list, one sync), so that each tile's pairs are the slice keys[bounds[t]:bounds[t+1]]."""
    n, k = ids.shape
    chunks = -(-v // cfg.cols)
    row = torch.arange(n, device=ids.device).repeat_interleave(k)
    flat = ids.reshape(-1)
    block, chunk = row // cfg.rows, flat // cfg.cols
    tile = block * chunks + chunk
    keys = (tile * cfg.rows + (row - block * cfg.rows)) * cfg.cols + (flat - chunk * cfg.cols)
    keys, inverse = torch.unique(keys, sorted=True, return_inverse=True)
    tiles = -(-n // cfg.rows) * chunks
    counts = torch.bincount(keys // (cfg.rows * cfg.cols), minlength=tiles)
    return keys, inverse, [0, *torch.cumsum(counts, 0).tolist()]


def _decode(keys: torch.Tensor, cfg: _Config) -> tuple[torch.Tensor, torch.Tensor]:
    """In-tile (row, column) of each key."""
    rem = keys % (cfg.rows * cfg.cols)
    return rem // cfg.cols, rem % cfg.cols


# --- forward / backward ------------------------------------------------------------------------------------------


def _forward(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, cfg: _Config):
    """(logprobs `[N, k]`, entropy `[N]`, topk ids `[N, topk]` (empty when topk = 0), saved) where saved =
    (lse `[N]`, keys, inverse, z at keys `[U]`, bounds) for the backward."""
    n, k = ids.shape
    v = weight.shape[0]
    fold = _body("fold", cfg)
    keys, inverse, bounds = _entries(ids, cfg, v)
    in_row, in_col = _decode(keys, cfg)
    picked = []
    lse = torch.empty(n, dtype=cfg.acc, device=hidden.device)
    entropy = torch.empty_like(lse)
    top = torch.empty(n, cfg.topk, dtype=torch.long, device=hidden.device)
    t = 0
    with torch.autocast(hidden.device.type, enabled=False):
        for r0 in range(0, n, cfg.rows):
            h = hidden[r0 : r0 + cfg.rows].to(cfg.dtype)
            r = h.shape[0]
            m = torch.full((r,), _NO_MAX, dtype=cfg.acc, device=h.device)
            s = torch.zeros_like(m)
            xs = torch.zeros_like(m)
            best = None
            for v0 in range(0, v, cfg.cols):
                tile = h @ weight[v0 : v0 + cfg.cols].to(cfg.dtype).t()
                a, b = bounds[t], bounds[t + 1]
                t += 1
                if b > a:  # before the fold, which may reuse the tile's memory
                    picked.append(tile[in_row[a:b], in_col[a:b]])
                if cfg.topk:
                    best = _merge_topk(best, tile, v0, cfg.topk)
                m, s, xs = fold(tile, m, s, xs, cfg.inv_t)
                del tile
            lse[r0 : r0 + r] = m + s.log()
            entropy[r0 : r0 + r] = s.log() - xs / s
            if cfg.topk:
                top[r0 : r0 + r] = best[1]
    picked = torch.cat(picked).to(cfg.acc)  # z at each distinct (row, id), in key order
    if cfg.inv_t != 1.0:
        picked = picked.mul_(cfg.inv_t)
    logprobs = picked[inverse].view(n, k) - lse.unsqueeze(1)
    return logprobs, entropy, top, (lse, keys, inverse, picked, bounds)


def _merge_topk(best, tile: torch.Tensor, v0: int, topk: int):
    """Running (values, ids) `[r, <= topk]` merged with a tile's own top-k."""
    vals, idx = tile.topk(min(topk, tile.shape[1]), dim=1)
    idx = idx + v0
    if best is not None:
        vals, idx = torch.cat([best[0], vals], 1), torch.cat([best[1], idx], 1)
        vals, pos = vals.topk(min(topk, vals.shape[1]), dim=1)
        idx = idx.gather(1, pos)
    return vals, idx


class _HiddenLogprobsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, ids, cfg: _Config):
        logprobs, entropy, top, (lse, keys, inverse, picked, bounds) = _forward(hidden, weight, ids, cfg)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(top)
        if not cfg.entropy_grad:
            ctx.mark_non_differentiable(entropy)
        ctx.save_for_backward(hidden, weight, lse, entropy if cfg.entropy_grad else None, keys, inverse, picked)
        ctx.cfg, ctx.bounds = cfg, bounds
        return logprobs, entropy, top

    @staticmethod
    @once_differentiable
    def backward(ctx, g_logprobs, g_entropy, _g_top):
        hidden, weight, lse, entropy, keys, inverse, picked = ctx.saved_tensors
        cfg: _Config = ctx.cfg
        need_h, need_w = ctx.needs_input_grad[:2]
        if not cfg.entropy_grad:
            g_entropy = None
        if (g_logprobs is None and g_entropy is None) or not (need_h or need_w):
            return None, None, None, None
        grads = _backward(hidden, weight, lse, entropy, keys, inverse, picked, ctx.bounds, cfg,
                          g_logprobs, g_entropy, need_h, need_w)
        return *grads, None, None


def _backward(hidden, weight, lse, entropy, keys, inverse, picked, bounds, cfg: _Config,
              g_logprobs, g_entropy, need_h: bool, need_w: bool):
    """(grad_hidden, grad_weight): vocabulary slices outer, row blocks inner; see the module docstring."""
    n, v = hidden.shape[0], weight.shape[0]
    grad = _body("grad", cfg)
    # row vectors of the dense part p * (a + b (log p + H)), with 1/T folded in
    a = torch.zeros_like(lse) if g_logprobs is None else g_logprobs.to(cfg.acc).sum(1).mul_(-cfg.inv_t)
    b = None if g_entropy is None else g_entropy.to(cfg.acc).mul(-cfg.inv_t)
    at_ids = None if g_logprobs is None else _id_grads(g_logprobs, lse, entropy, a, b, keys, inverse, picked, v, cfg)
    # fp32 accumulators where the inputs are lower precision: each returned gradient is rounded once. With one
    # vocabulary slice (row block), grad_hidden (grad_weight) is one matmul, summed in fp32 inside it.
    direct_h = need_h and v <= cfg.cols and hidden.dtype == cfg.dtype
    direct_w = need_w and n <= cfg.rows and weight.dtype == cfg.dtype
    acc_h = None
    if need_h:
        acc_h = torch.empty_like(hidden, memory_format=torch.contiguous_format) if direct_h else torch.zeros(
            hidden.shape, dtype=torch.promote_types(hidden.dtype, cfg.acc), device=hidden.device)
    grad_w = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if need_w else None
    acc_w_dtype = torch.promote_types(weight.dtype, cfg.acc)
    chunks = -(-v // cfg.cols)
    with torch.autocast(hidden.device.type, enabled=False):
        for j, v0 in enumerate(range(0, v, cfg.cols)):
            w = weight[v0 : v0 + cfg.cols].to(cfg.dtype)
            acc_w = None
            if need_w and not direct_w:
                acc_w = grad_w[v0 : v0 + cfg.cols] if weight.dtype == acc_w_dtype else torch.empty(
                    w.shape, dtype=acc_w_dtype, device=w.device)
                acc_w.zero_()
            for i, r0 in enumerate(range(0, n, cfg.rows)):
                h = hidden[r0 : r0 + cfg.rows].to(cfg.dtype)
                rs = slice(r0, r0 + h.shape[0])
                g_tile = grad(h @ w.t(), lse[rs], entropy[rs] if b is not None else lse[rs], a[rs],
                              None if b is None else b[rs], cfg.inv_t)
                lo, hi = bounds[i * chunks + j], bounds[i * chunks + j + 1]
                if at_ids is not None and hi > lo:
                    in_row, in_col, values = at_ids
                    g_tile[in_row[lo:hi], in_col[lo:hi]] = values[lo:hi]
                if direct_h:
                    torch.mm(g_tile, w, out=acc_h[rs])
                elif need_h:
                    _addmm_(acc_h[rs], g_tile, w)
                if direct_w:
                    torch.mm(g_tile.t(), h, out=grad_w[v0 : v0 + cfg.cols])
                elif need_w:
                    _addmm_(acc_w, g_tile.t(), h)
                del g_tile
            if acc_w is not None and acc_w.dtype != grad_w.dtype:
                grad_w[v0 : v0 + cfg.cols] = acc_w
            del acc_w
    del at_ids  # before the copy of grad_hidden to its dtype, where the backward peaks
    return (acc_h.to(hidden.dtype) if need_h else None), grad_w


def _id_grads(g_logprobs, lse, entropy, a, b, keys, inverse, picked, v: int, cfg: _Config):
    """The logits gradient at each distinct requested (row, id): g (summed over duplicates) / T plus the dense
    part, from the saved z, in fp32 and rounded once to the tile dtype. Returns (in-tile row, column, value) `[U]`.
    """
    in_row, in_col = _decode(keys, cfg)
    row = (keys // (cfg.rows * cfg.cols) // -(-v // cfg.cols)) * cfg.rows + in_row
    g = torch.zeros_like(picked).index_add_(0, inverse, g_logprobs.to(cfg.acc).reshape(-1))
    logp = picked - lse[row]
    dense = a[row] if b is None else a[row] + b[row] * (logp + entropy[row])
    return in_row, in_col, (g * cfg.inv_t + logp.exp() * dense).to(cfg.dtype)


def _addmm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, the product summed in acc's precision (not rounded to a's dtype first)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda and acc.dtype == torch.float32:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))
