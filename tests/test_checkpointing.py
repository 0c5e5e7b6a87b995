"""Activation checkpointing modes (models/checkpointing.py): the same gradients as no checkpointing, and
`selective` skips the attention kernel in the backward's recomputation where `on` runs it again."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import TINY
from models.checkpointing import _ATTENTION_OPS, checkpointing_mode, enable_checkpointing
from models.factory import TinyModelSpec, build_model


class CountAttention(TorchDispatchMode):
    """Counts attention kernels that actually run (a saved output served by selective checkpointing does not)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func in _ATTENTION_OPS
        return func(*args, **(kwargs or {}))


def test_checkpointing_modes_give_the_same_gradients_and_selective_keeps_attention(project_tokenizer):
    torch.manual_seed(0)
    base = build_model(TinyModelSpec(family="qwen3_moe", **dict(TINY, num_layers=2)), project_tokenizer, seed=1)
    ids = torch.randint(0, 500, (2, 24))
    grads, recomputed = {}, {}
    for mode in ("off", "on", "selective"):
        model = copy.deepcopy(base).train()
        model.config.use_cache = False
        enable_checkpointing(model, mode)
        with CountAttention() as forward_count:
            loss = model(input_ids=ids, use_cache=False).logits.float().square().mean()
        assert forward_count.calls == 2  # one attention kernel per layer (the sdpa path, not the math one)
        with CountAttention() as backward_count:
            loss.backward()
        recomputed[mode] = backward_count.calls
        grads[mode] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert recomputed == {"off": 0, "on": 2, "selective": 0}
    for mode in ("on", "selective"):
        assert grads[mode].keys() == grads["off"].keys()
        for name, grad in grads["off"].items():
            torch.testing.assert_close(grads[mode][name], grad, rtol=1e-5, atol=1e-7, msg=f"{mode}: {name}")


def test_auto_means_on_for_cuda_and_off_elsewhere_and_bad_modes_are_refused():
    assert checkpointing_mode("auto", torch.device("cuda")) == "on"
    assert checkpointing_mode("auto", torch.device("cpu")) == "off"
    assert checkpointing_mode("selective", torch.device("cpu")) == "selective"
    with pytest.raises(ValueError, match="not one of"):
        enable_checkpointing(torch.nn.Linear(2, 2), "sometimes")
