"""`grouped_mm_permute`: transformers' grouped-GEMM MoE experts with the token permutations as gathers.

transformers' `grouped_mm` experts sort the (token, expert) pairs by expert, gather `hidden[perm // k]`, run two
grouped GEMMs, multiply by the routing weights, gather the result back by the inverse permutation and sum each
token's k rows. Autograd turns each gather into an `index_put_(accumulate=True)` in the backward: a sort-based
scatter-add over `[N * k, H]` rows. At 32K tokens with 8 of 128 experts active (hidden 2048), they took 190 ms
of a 1.05 s update on an H100 (`bench/bench_train_step.py --profile`), more than the grouped GEMMs themselves.

Both gathers are by a permutation, so their gradients are gathers too. Here:
- `_ExpandRows` (token-major -> expert-major): forward `x[perm // k]`; backward, for each token, the sum of its
  k rows of the gradient, found by the inverse permutation;
- `_CollectRows` (expert-major -> token-major, with the routing weights): forward, for each token, the weighted
  fp32 sum of its k expert outputs; backward, each pair's row `w * grad[token]` and its weight's gradient
  `<grad[token], y[pair]>`.
On CUDA both run as one Triton kernel per direction (`models/moe_gather_triton.py`: each row read and written
once); elsewhere, or without Triton, as torch ops. Same values, same grouped GEMMs, no scatter (`bench/
bench_moe_experts.py` times each path).

Registered in transformers' experts interface; a model switches with `set_experts_implementation`.
"""

from __future__ import annotations

import torch

from models.optional_kernels import kernels_module

GROUPED_MM_PERMUTE = "grouped_mm_permute"

# None: the Triton kernels on CUDA tensors when Triton imports, torch ops otherwise; False: torch ops always.
USE_TRITON: bool | None = None


def _triton(t: torch.Tensor):
    """The Triton kernels module if they serve tensor `t`, else None."""
    if USE_TRITON is False or not t.is_cuda:
        return None
    return kernels_module("moe_gather_triton")


def expand_rows(x: torch.Tensor, perm: torch.Tensor, k: int) -> torch.Tensor:
    """x `[N, H]` -> `[N k, H]`, row i = `x[perm[i] // k]`."""
    kernels = _triton(x)
    return kernels.expand_rows(x, perm, k) if kernels else x.index_select(0, perm // k)


def collect_rows(y: torch.Tensor, inverse: torch.Tensor, weights: torch.Tensor | None, k: int,
                 dtype: torch.dtype) -> torch.Tensor:
    """y `[N k, H]` -> `[N, H]` of `dtype`, row t = fp32 sum over j of `weights[t, j] * y[inverse[t k + j]]`."""
    kernels = _triton(y)
    if kernels:
        return kernels.collect_rows(y, inverse, weights, k, dtype)
    rows = y.index_select(0, inverse).view(-1, k, y.shape[-1]).float()
    if weights is not None:
        rows = rows * weights.float().unsqueeze(-1)
    return rows.sum(1).to(dtype)


def collect_rows_backward(grad: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, perm: torch.Tensor,
                          inverse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """grad `[N, H]` of `collect_rows(y, inverse, weights)` -> (grad_y `[N k, H]`: row `inverse[t k + j]` is
    `weights[t, j] * grad[t]`; grad_weights `[N, k]`: `<grad[t], y[inverse[t k + j]]>`)."""
    kernels = _triton(y)
    if kernels:
        return kernels.collect_rows_backward(grad, y, inverse, weights)
    n, k = weights.shape
    g = grad.float().unsqueeze(1)  # [N, 1, H]
    rows = y.index_select(0, inverse).view(n, k, -1).float()
    grad_w = (g * rows).sum(-1).to(weights.dtype)
    grad_y = (g * weights.float().unsqueeze(-1)).to(y.dtype).view(n * k, -1).index_select(0, perm)
    return grad_y, grad_w


class _ExpandRows(torch.autograd.Function):
    """x `[N, H]` -> `[N k, H]` in expert order; the gradient sums each token's k rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.k = k
        return expand_rows(x, perm, k)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return collect_rows(grad, inverse, None, ctx.k, grad.dtype), None, None, None


class _CollectRows(torch.autograd.Function):
    """y `[N k, H]` in expert order, weights `[N, k]` -> `[N, H]`: each token's weighted sum of its k rows."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, weights: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(y, weights, perm, inverse)
        return collect_rows(y, inverse, weights, weights.shape[1], dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        y, weights, perm, inverse = ctx.saved_tensors
        grad_y, grad_w = collect_rows_backward(grad, y, weights, perm, inverse)
        return grad_y, grad_w, None, None, None


def grouped_mm_permute_experts(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                               top_k_weights: torch.Tensor) -> torch.Tensor:
    """hidden_states `[N, H]`, top_k_index / top_k_weights `[N, k]` -> `[N, H]`: sum over each token's k experts
    of weight x expert(hidden). Gated experts without bias or expert parallelism (Qwen3-MoE's); anything else goes
    to transformers' own `grouped_mm`."""
    from transformers.integrations.moe import _grouped_linear, grouped_mm_experts_forward

    if self.has_bias or not self.has_gate or getattr(self, "_is_expert_parallel", False):
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    k = top_k_index.shape[1]
    expert_ids, perm = torch.sort(top_k_index.reshape(-1))
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    x = _ExpandRows.apply(hidden_states, perm, inverse, k)  # [N k, H], grouped by expert
    # histc, not bincount, as transformers does: CUDA wants int input, the CPU float
    counts = torch.histc(expert_ids.int() if expert_ids.is_cuda else expert_ids.float(), bins=self.num_experts,
                         min=0, max=self.num_experts - 1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    h = self._apply_gate(_grouped_linear(x, self.gate_up_proj, offsets, is_transposed=self.is_transposed))
    y = _grouped_linear(h, self.down_proj, offsets, is_transposed=self.is_transposed)
    return _CollectRows.apply(y, top_k_weights, perm, inverse, hidden_states.dtype)


def register() -> None:
    """Make `grouped_mm_permute` a transformers experts implementation (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(GROUPED_MM_PERMUTE, grouped_mm_permute_experts)


def use_permute_experts(model: torch.nn.Module) -> bool:
    """Switch a model whose experts run transformers' `grouped_mm` to `grouped_mm_permute`; True if switched."""
    config = getattr(model, "config", None)
    if config is None or getattr(config.get_text_config(), "_experts_implementation", None) != "grouped_mm":
        return False
    register()
    model.set_experts_implementation(GROUPED_MM_PERMUTE)
    return True
