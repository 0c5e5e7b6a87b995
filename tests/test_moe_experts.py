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
