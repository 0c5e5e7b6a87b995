"""Triton kernels for the MoE experts' token permutations (CUDA; `models.moe_experts` falls back to torch ops).

With S = N * k (token, expert) pairs sorted by expert (`perm`, and `inverse` its inverse permutation):
- `expand_rows`: `out[i] = x[perm[i] // k]`, x `[N, H]` -> `[S, H]` (each token once per chosen expert);
- `collect_rows`: `out[t] = sum_j w[t, j] * y[inverse[t k + j]]`, y `[S, H]` -> `[N, H]`, accumulated in fp32
  (w None: weights of 1; the expand's backward);
- `collect_rows_backward`: for each pair, `grad_y[inverse[t k + j]] = w[t, j] * grad[t]` and
  `grad_w[t, j] = <grad[t], y[inverse[t k + j]]>` in one pass over y.
One program per row (all H columns), so each reads and writes each row once: bandwidth-bound copies, where
torch's index_select, the weight multiply, the reshape-sum and their backward (expand, copy, multiply, reduce)
pass over the `[S, H]` tensor five to seven times.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _launch(h: int) -> dict:
    block = triton.next_power_of_2(h)
    return {"BLOCK_H": block, "num_warps": 4 if block <= 2048 else 8}


@triton.jit
def _expand_kernel(X, PERM, OUT, H, K: tl.constexpr, BLOCK_H: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    src = tl.load(PERM + i).to(tl.int64) // K
    offs = tl.arange(0, BLOCK_H)
    m = offs < H
    tl.store(OUT + i * H + offs, tl.load(X + src * H + offs, mask=m), mask=m)


@triton.jit
def _collect_kernel(Y, INVERSE, W, OUT, H, K: tl.constexpr, HAS_W: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    m = offs < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(K):
        r = tl.load(INVERSE + t * K + j).to(tl.int64)
        row = tl.load(Y + r * H + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_W:
            row = row * tl.load(W + t * K + j).to(tl.float32)
        acc += row
    tl.store(OUT + t * H + offs, acc.to(OUT.dtype.element_ty), mask=m)


@triton.jit
def _collect_backward_kernel(G, Y, INVERSE, W, GY, GW, H, K: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    m = offs < H
    g = tl.load(G + t * H + offs, mask=m, other=0.0).to(tl.float32)
    for j in tl.static_range(K):
        r = tl.load(INVERSE + t * K + j).to(tl.int64)
        w = tl.load(W + t * K + j).to(tl.float32)
        y = tl.load(Y + r * H + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(GW + t * K + j, tl.sum(g * y, axis=0).to(GW.dtype.element_ty))
        tl.store(GY + r * H + offs, (g * w).to(GY.dtype.element_ty), mask=m)


def expand_rows(x: torch.Tensor, perm: torch.Tensor, k: int) -> torch.Tensor:
    """x `[N, H]`, perm `[N k]` -> `[N k, H]`: row i is `x[perm[i] // k]`."""
    x = x.contiguous()
    out = x.new_empty(perm.numel(), x.shape[1])
    if out.numel():
        _expand_kernel[(perm.numel(),)](x, perm, out, x.shape[1], K=k, **_launch(x.shape[1]))
    return out


def collect_rows(y: torch.Tensor, inverse: torch.Tensor, weights: torch.Tensor | None, k: int,
                 dtype: torch.dtype) -> torch.Tensor:
    """y `[N k, H]`, inverse `[N k]`, weights `[N, k]` or None -> `[N, H]` of `dtype`: row t is the
    (weighted) fp32 sum of `y[inverse[t k + j]]` over j."""
    y = y.contiguous()
    n = inverse.numel() // k
    out = torch.empty(n, y.shape[1], dtype=dtype, device=y.device)
    if out.numel():
        w = weights.contiguous() if weights is not None else y  # unread when HAS_W is False
        _collect_kernel[(n,)](y, inverse, w, out, y.shape[1], K=k, HAS_W=weights is not None,
                              **_launch(y.shape[1]))
    return out


def collect_rows_backward(grad: torch.Tensor, y: torch.Tensor, inverse: torch.Tensor,
                          weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """grad `[N, H]` of `collect_rows(y, inverse, weights)` -> (grad_y `[N k, H]`, grad_weights `[N, k]`)."""
    grad, y, weights = grad.contiguous(), y.contiguous(), weights.contiguous()
    n, k = weights.shape
    grad_y = torch.empty_like(y)
    grad_w = torch.empty_like(weights)
    if y.numel():
        _collect_backward_kernel[(n,)](grad, y, inverse, weights, grad_y, grad_w, y.shape[1], K=k,
                                       **_launch(y.shape[1]))
    return grad_y, grad_w
