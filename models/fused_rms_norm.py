"""RMSNorm as one kernel per direction on CUDA, for the student's decoder layers.

transformers' Qwen3 RMSNorm (`w * (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(x.dtype)`) runs as about five
elementwise kernels over an fp32 copy of x, and autograd's backward as about ten. At 32K tokens of the 30B-A3B
layer shape, four norms a layer (input, post-attention, and the per-head query and key norms over `[T, heads,
128]`) run in the forward, again in the checkpointed recomputation and in the backward: a share of the training
step's unfused elementwise time (`bench/README.md`, the profile). `use_fused_rms_norm(model)` gives those modules
a forward that runs `models.rms_norm_triton` on CUDA tensors (one read of x, one write of y forward; one pass
backward) and keeps transformers' own forward everywhere else. The fused kernels compute in fp32 and round once,
where transformers rounds x_hat to x's dtype before the weight multiply: the two differ by bf16 rounding.
"""

from __future__ import annotations

import os
import types

import torch
from torch.autograd.function import once_differentiable

from models.optional_kernels import kernels_module

# None: the Triton kernels on CUDA tensors when Triton imports; False: transformers' forward always (benchmarks)
USE_TRITON: bool | None = None

# transformers' RMSNorm classes whose forward is `weight * (x * rsqrt(mean(x^2) + variance_epsilon)).to(dtype)`,
# checked against the fused path in tests/test_fused_rms_norm.py
FORMULA_CLASSES = ("Qwen3MoeRMSNorm", "Qwen3RMSNorm", "Qwen2RMSNorm", "Qwen3VLMoeTextRMSNorm", "Qwen3VLTextRMSNorm")


def _kernels(t: torch.Tensor):
    """`models.rms_norm_triton` for tensor t (on CUDA, or any tensor under Triton's CPU interpreter, which the
    kernel tests use), or None: the torch ops of `_torch_forward` / `_torch_backward`."""
    if USE_TRITON is False or not (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return None
    return kernels_module("rms_norm_triton")


def _torch_forward(x: torch.Tensor, weight: torch.Tensor, eps: float,
                   out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' math in torch ops (x `[R, H]`): fp32 (fp64 for fp64 inputs) throughout, one rounding."""
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    return (xf * rstd[:, None] * weight.to(acc)).to(out_dtype), rstd


def _torch_backward(x, weight, rstd, dy) -> tuple[torch.Tensor, torch.Tensor]:
    acc = rstd.dtype
    x_hat = x.to(acc) * rstd[:, None]
    g = dy.to(acc) * weight.to(acc)
    c = (g * x_hat).mean(-1, keepdim=True)
    return ((g - x_hat * c) * rstd[:, None]).to(x.dtype), (dy.to(acc) * x_hat).sum(0)


class _FusedRMSNorm(torch.autograd.Function):
    """x `[..., H]`, weight `[H]` -> `[..., H]` of the promoted dtype (as transformers' `weight * x_hat`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rows, weight = x.reshape(-1, x.shape[-1]).contiguous(), weight.contiguous()
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
        kernels = _kernels(x)
        run = kernels.rms_norm_forward if kernels else _torch_forward
        y, rstd = run(rows, weight, float(eps), out_dtype)
        ctx.save_for_backward(rows, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor):
        rows, weight, rstd = ctx.saved_tensors
        dy = dy.reshape(rows.shape).contiguous()
        kernels = _kernels(rows)
        run = kernels.rms_norm_backward if kernels else _torch_backward
        dx, dw = run(rows, weight, rstd, dy)
        return dx.view(ctx.x_shape), dw.to(weight.dtype), None


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x's last dimension: the Triton kernels on CUDA (or under the interpreter), torch ops elsewhere."""
    return _FusedRMSNorm.apply(x, weight, eps)


def _forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if hidden_states.is_cuda and _kernels(hidden_states) is not None:
        return fused_rms_norm(hidden_states, self.weight, self.variance_epsilon)
    return type(self).forward(self, hidden_states)


def use_fused_rms_norm(model: torch.nn.Module) -> int:
    """Give every RMSNorm of `model` of a `FORMULA_CLASSES` class the fused forward (used on CUDA tensors only);
    returns how many modules were switched."""
    switched = 0
    for module in model.modules():
        if type(module).__name__ in FORMULA_CLASSES and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_forward, module)
            switched += 1
    return switched
