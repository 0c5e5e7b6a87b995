"""`grouped_mm_permute`: transformers' grouped-GEMM MoE experts with the token permutations' backward as gathers.

transformers' `grouped_mm` experts sort the (token, expert) pairs by expert, gather `hidden[perm // k]`, run two
grouped GEMMs, and gather the result back by the inverse permutation. Autograd turns each of those gathers into an
`index_put_(accumulate=True)` in the backward: a sort-based scatter-add over `[N * k, H]` rows. At 32K tokens with
8 of 128 experts active (hidden 2048), they took 190 ms of a 1.05 s update on an H100 (`bench/bench_train_step.py
--profile`), more than the grouped GEMMs themselves. Both gathers are by a permutation, so their gradients are
gathers too: by the inverse permutation, then (for the k copies of each token) a sum over k. Same values, same
grouped GEMMs, no scatter: 129 ms in the same update (`bench/README.md`).

Registered in transformers' experts interface; a model switches with `set_experts_implementation`.
"""

from __future__ import annotations

import torch

GROUPED_MM_PERMUTE = "grouped_mm_permute"


class _PermuteRows(torch.autograd.Function):
    """`x[index // repeat]` where `index` is a permutation of `[0, rows * repeat)` and `inverse` its inverse.
    x `[rows, H]` -> `[rows * repeat, H]`; the gradient is `grad[inverse]` summed over each row's `repeat` copies."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, repeat: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.repeat = repeat
        return x.index_select(0, index // repeat if repeat > 1 else index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        g = grad.index_select(0, inverse)
        if ctx.repeat > 1:
            g = g.view(-1, ctx.repeat, g.shape[-1]).sum(1, dtype=torch.float32).to(grad.dtype)
        return g, None, None, None


def grouped_mm_permute_experts(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                               top_k_weights: torch.Tensor) -> torch.Tensor:
    """hidden_states `[N, H]`, top_k_index / top_k_weights `[N, k]` -> `[N, H]`: sum over each token's k experts
    of weight x expert(hidden). Gated experts without bias or expert parallelism (Qwen3-MoE's); anything else goes
    to transformers' own `grouped_mm`."""
    from transformers.integrations.moe import _grouped_linear, grouped_mm_experts_forward

    if self.has_bias or not self.has_gate or getattr(self, "_is_expert_parallel", False):
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    n, k = top_k_index.shape
    expert_ids, perm = torch.sort(top_k_index.reshape(-1))
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    x = _PermuteRows.apply(hidden_states, perm, inverse, k)  # [N k, H], grouped by expert
    weights = top_k_weights.reshape(-1)[perm]
    # histc, not bincount, as transformers does: CUDA wants int input, the CPU float
    counts = torch.histc(expert_ids.int() if expert_ids.is_cuda else expert_ids.float(), bins=self.num_experts,
                         min=0, max=self.num_experts - 1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    h = self._apply_gate(_grouped_linear(x, self.gate_up_proj, offsets, is_transposed=self.is_transposed))
    out = _grouped_linear(h, self.down_proj, offsets, is_transposed=self.is_transposed) * weights.unsqueeze(-1)
    out = _PermuteRows.apply(out, inverse, perm, 1)  # back to token-major [N k, H]
    return out.view(n, k, -1).sum(dim=1).to(hidden_states.dtype)


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
