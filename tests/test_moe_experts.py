"""`grouped_mm_permute` (models/moe_experts.py): transformers' grouped-GEMM experts with gather-only backward."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import TINY
from models.factory import TinyModelSpec, build_model
from models.moe_experts import GROUPED_MM_PERMUTE, use_permute_experts


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen3_vl_moe"])  # row-major and transposed expert weights
def test_permuted_experts_give_grouped_mms_outputs_and_gradients(project_tokenizer, family):
    """8 experts, 3 active per token: every token reaches several experts, so the backward sums k copies."""
    spec = dict(TINY, num_experts=8, experts_per_token=3, num_layers=2)
    torch.manual_seed(0)
    plain = build_model(TinyModelSpec(family=family, **spec), project_tokenizer, seed=1).train()
    assert plain.config.get_text_config()._experts_implementation == "grouped_mm"
    permuted = copy.deepcopy(plain)
    assert use_permute_experts(permuted)
    assert permuted.config.get_text_config()._experts_implementation == GROUPED_MM_PERMUTE
    assert not use_permute_experts(permuted)  # already switched: nothing to do
    ids = torch.randint(0, 500, (2, 16))
    outs = []
    for model in (plain, permuted):
        logits = model(input_ids=ids).logits
        (logits.float().square().mean()).backward()
        outs.append((logits, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (want, want_grads), (got, got_grads) = outs
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert want_grads.keys() == got_grads.keys() and any("experts" in n for n in got_grads)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [2048, 100])  # a power of two, and one the kernels mask
def test_triton_gathers_equal_the_torch_ops_on_cuda(monkeypatch, dtype, hidden):
    """The Triton expand / collect kernels give the torch-op path's outputs and gradients (x, weights, y)."""
    pytest.importorskip("triton")
    import models.moe_experts as moe

    n, k, g = 3000, 8, torch.Generator(device="cuda").manual_seed(0)
    perm = torch.randperm(n * k, device="cuda", generator=g)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(n * k, device="cuda")
    x0 = torch.randn(n, hidden, device="cuda", generator=g).to(dtype)
    y0 = torch.randn(n * k, hidden, device="cuda", generator=g).to(dtype)
    w0 = torch.rand(n, k, device="cuda", generator=g).to(dtype)
    up = torch.randn(n, hidden, device="cuda", generator=g).to(dtype)
    results = []
    for use_triton in (False, True):
        monkeypatch.setattr(moe, "USE_TRITON", None if use_triton else False)
        x, y, w = (t.clone().requires_grad_() for t in (x0, y0, w0))
        expanded = moe._ExpandRows.apply(x, perm, inverse, k)
        collected = moe._CollectRows.apply(y, w, perm, inverse, dtype)
        (expanded.float().square().sum() / 2 + (collected.float() * up.float()).sum()).backward()
        results.append((expanded, collected, x.grad, y.grad, w.grad))
    assert torch.equal(results[0][0], results[1][0])  # a copy: exact
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=2e-2)  # w.grad: 2048-term dots
    for name, a, b in zip(["collected", "x.grad", "y.grad", "w.grad"], results[0][1:], results[1][1:]):
        torch.testing.assert_close(b.float(), a.float(), msg=name, **tol)
