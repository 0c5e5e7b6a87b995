"""The fused RMSNorm (models/fused_rms_norm.py): its math against transformers' norms, the switch of a student's
norms, the Triton kernels in Triton's CPU interpreter, and on CUDA."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.fused_rms_norm import FORMULA_CLASSES, _FusedRMSNorm, fused_rms_norm, use_fused_rms_norm

ROOT = Path(__file__).resolve().parents[1]
MODULES = {"Qwen3MoeRMSNorm": "qwen3_moe", "Qwen3RMSNorm": "qwen3", "Qwen2RMSNorm": "qwen2",
           "Qwen3VLMoeTextRMSNorm": "qwen3_vl_moe", "Qwen3VLTextRMSNorm": "qwen3_vl"}


def _norm_class(name: str):
    return getattr(importlib.import_module(f"transformers.models.{MODULES[name]}.modeling_{MODULES[name]}"), name)


@pytest.mark.parametrize("name", FORMULA_CLASSES)
@pytest.mark.parametrize("shape", [(3, 5, 48), (2, 7, 4, 16)])  # hidden states; per-head (query / key norms)
def test_fused_math_equals_each_transformers_norm(name, shape):
    """Forward and both gradients of the fused path's math (torch ops on CPU) against transformers' module under
    autograd, in float32 (transformers computes in float32 whatever the input)."""
    torch.manual_seed(0)
    norm = _norm_class(name)(shape[-1], eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1]))
    x = torch.randn(*shape, requires_grad=True)
    up = torch.randn(*shape)
    want = norm(x)
    want_dx, want_dw = torch.autograd.grad(want, (x, norm.weight), up)
    got = fused_rms_norm(x, norm.weight, norm.variance_epsilon)
    got_dx, got_dw = torch.autograd.grad(got, (x, norm.weight), up)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_dx, want_dx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_dw, want_dw, rtol=1e-5, atol=1e-5)


def test_fused_function_passes_gradcheck():
    """The hand-written backward (dx and dw) against finite differences, in float64."""
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _FusedRMSNorm.apply(a, b, 1e-5), (x, w))


def test_student_norms_switched_and_cpu_outputs_unchanged(project_tokenizer):
    """Every decoder norm (input, post-attention, query, key) and the final norm get the fused forward; on the
    CPU that forward is transformers' own, so the model's logits are bit-identical."""
    from conftest import TINY  # (imported here: the GPU image lacks what conftest needs, and the CUDA tests don't)
    from models.factory import TinyModelSpec, build_model

    torch.manual_seed(0)
    model = build_model(TinyModelSpec(family="qwen3_moe", **dict(TINY, num_layers=2)), project_tokenizer, seed=1)
    ids = torch.randint(0, 500, (2, 12))
    before = model(input_ids=ids).logits
    assert use_fused_rms_norm(model) == 2 * 4 + 1
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)


KERNELS = """
import torch
from models.fused_rms_norm import fused_rms_norm
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm
torch.manual_seed(0)
for shape in [(37, 48), (5, 9, 3, 16), (300, 128)]:  # a masked row size; per-head rows; several row blocks
    norm = Qwen3MoeRMSNorm(shape[-1], eps=1e-6).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1]))
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    up = torch.randn(*shape, dtype=torch.float64)
    want = norm(x)
    want_dx, want_dw = torch.autograd.grad(want, (x, norm.weight), up)
    x32 = x.detach().float().requires_grad_()
    w32 = norm.weight.detach().float().requires_grad_()
    got = fused_rms_norm(x32, w32, norm.variance_epsilon)  # the kernels: CPU tensors under TRITON_INTERPRET=1
    got_dx, got_dw = torch.autograd.grad(got, (x32, w32), up.float())
    for g, w in ((got, want), (got_dx, want_dx), (got_dw, want_dw)):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)
print("ok")
"""


def test_triton_kernels_in_the_interpreter():
    """The Triton forward and backward (run by Triton's CPU interpreter, fp32) against transformers' norm in
    float64. Skipped where Triton is absent (CI); see tests/test_dsa_kernels_interpreter.py for the setup."""
    pytest.importorskip("triton")
    pytest.importorskip("numpy")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", KERNELS], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4096, 2048), (2, 1000, 32, 128), (333, 100)])
def test_triton_norm_equals_transformers_on_cuda(dtype, shape):
    """The Triton kernels against transformers' norm on CUDA: fp32 to float tolerance; bf16 within bf16 rounding
    of the fp32 result (the kernels round once, transformers twice)."""
    pytest.importorskip("triton")
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm

    g = torch.Generator(device="cuda").manual_seed(0)
    norm = Qwen3MoeRMSNorm(shape[-1], eps=1e-6).cuda()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], device="cuda", generator=g))
    x0 = torch.randn(*shape, device="cuda", generator=g)
    up = torch.randn(*shape, device="cuda", generator=g)
    exact = None
    results = []
    for fused, dt in ((False, torch.float32), (False, dtype), (True, dtype)):
        mod = Qwen3MoeRMSNorm(shape[-1], eps=1e-6).cuda().to(dt)
        mod.weight.data.copy_(norm.weight.data.to(dt))
        if fused:
            use_fused_rms_norm(mod)
        x = x0.to(dt).requires_grad_()
        y = mod(x)
        dx, dw = torch.autograd.grad(y, (x, mod.weight), up.to(dt))
        results.append((y.float(), dx.float(), dw.float()))
    exact, plain, fused = results
    for e, p, f, what in zip(exact, plain, fused, ("y", "dx", "dw")):
        if dtype == torch.float32:
            torch.testing.assert_close(f, e, rtol=1e-4, atol=1e-4, msg=what)
        else:  # the fused bf16 result is at least as close to fp32 as transformers' bf16 result, up to rounding
            err_fused = (f - e).abs().max().item()
            err_plain = (p - e).abs().max().item()
            scale = e.abs().max().item()
            assert err_fused <= max(1.5 * err_plain, 1e-2 * scale), (what, err_fused, err_plain)
