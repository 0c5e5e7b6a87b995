"""Triton kernels of RMSNorm, forward and backward (CUDA; `models.fused_rms_norm` falls back to torch ops).

For rows x `[R, H]` and weight w `[H]`: `r = rsqrt(mean(x^2) + eps)`, `y = w * x * r`, all in fp32 and rounded once.
Backward, with `x_hat = x r` and `g = dy * w`: `dx = r (g - x_hat mean(g x_hat))`, `dw = sum over rows of
dy x_hat`. Each kernel reads its rows once: transformers' RMSNorm runs about five elementwise passes over an fp32
copy of x forward and twice that backward. Programs take `BLOCK_R x BLOCK_H` tiles (several short rows at once:
the query/key norms have H = 128), and the backward's programs loop over row blocks, each keeping one fp32 partial
of dw, summed on the host side of the kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# elements of one program's tile: BLOCK_R rows of BLOCK_H (the row size rounded up to a power of two)
TILE_ELEMENTS = 4096


def _blocks(h: int) -> tuple[int, int]:
    block_h = triton.next_power_of_2(h)
    return max(1, TILE_ELEMENTS // block_h), block_h


@triton.jit
def _forward_kernel(X, W, Y, RSTD, R, H, eps, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_H)
    m = (rows[:, None] < R) & (cols[None, :] < H)
    offs = rows[:, None] * H + cols[None, :]
    x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cols < H, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / H + eps)
    tl.store(Y + offs, (x * rstd[:, None] * w[None, :]).to(Y.dtype.element_ty), mask=m)
    tl.store(RSTD + rows, rstd, mask=rows < R)


@triton.jit
def _backward_kernel(X, W, RSTD, DY, DX, DW_PARTIAL, R, H, BLOCKS_PER_PROGRAM,
                     BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    programs = tl.num_programs(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    cm = cols < H
    w = tl.load(W + cols, mask=cm, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_H], dtype=tl.float32)
    for b in range(0, BLOCKS_PER_PROGRAM):
        rows = (pid + b * programs) * BLOCK_R + tl.arange(0, BLOCK_R)
        rm = rows < R
        m = rm[:, None] & cm[None, :]
        offs = rows[:, None] * H + cols[None, :]
        x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=m, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rm, other=0.0)
        x_hat = x * rstd[:, None]
        g = dy * w[None, :]
        c = tl.sum(g * x_hat, axis=1) / H
        tl.store(DX + offs, ((g - x_hat * c[:, None]) * rstd[:, None]).to(DX.dtype.element_ty), mask=m)
        dw += tl.sum(dy * x_hat, axis=0)
    tl.store(DW_PARTIAL + pid * H + cols, dw, mask=cm)


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float,
                     out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x `[R, H]` (contiguous) -> (y `[R, H]` of `out_dtype`, rstd `[R]` fp32)."""
    rows, h = x.shape
    y = torch.empty((rows, h), dtype=out_dtype, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    block_r, block_h = _blocks(h)
    _forward_kernel[(triton.cdiv(rows, block_r),)](x, weight, y, rstd, rows, h, eps, BLOCK_R=block_r,
                                                   BLOCK_H=block_h, num_warps=4 if block_r * block_h <= 4096 else 8)
    return y, rstd


def rms_norm_backward(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                      dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (dx `[R, H]` of x's dtype, dw `[H]` fp32) of `rms_norm_forward` for the upstream dy `[R, H]`."""
    rows, h = x.shape
    block_r, block_h = _blocks(h)
    blocks = triton.cdiv(rows, block_r)
    programs = min(blocks, 4 * _multiprocessors(x.device))
    per_program = triton.cdiv(blocks, programs)
    dx = torch.empty_like(x)
    partial = torch.empty((programs, h), dtype=torch.float32, device=x.device)
    _backward_kernel[(programs,)](x, weight, rstd, dy, dx, partial, rows, h, per_program, BLOCK_R=block_r,
                                  BLOCK_H=block_h, num_warps=4)
    return dx, partial.sum(0)


def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":  # the interpreter: any grid works
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count
