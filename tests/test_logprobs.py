"""`models.logprobs.hidden_logprobs` against the plain computation: log_softmax(hidden @ weight.T / T) gathered at
the ids, the full entropy, torch.topk. Values and gradients (w.r.t. hidden and weight, random upstream gradients on
log-probs and entropy) in float64 at 1e-10. bf16 and fp32 inputs are compared with the float64 computation on the
same (upcast) values, at the tolerances stated per test. Plus: no `[N, V]` tensor is ever produced (an op-output
size probe on CPU; peak CUDA memory on a GPU)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from models import logprobs as lp_mod
from models.logprobs import hidden_logprobs, tile_shape

F64 = dict(atol=1e-10, rtol=1e-10)


def make(n=30, h=8, v=50, k=5, dtype=torch.float64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    # logits ~ N(0, 1)
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5).to(dtype).requires_grad_()
    ids = torch.randint(0, v, (n, k), generator=g)
    if k > 2:
        ids[:, 2] = ids[:, 0]  # a duplicate id in every row
    return hidden, weight, ids, g


def plain(hidden, weight, ids, temperature=1.0):
    """The reference: full float64 logits."""
    logp = torch.log_softmax(hidden.double() @ weight.double().T / temperature, -1)
    return logp.gather(1, ids), -(logp.exp() * logp).sum(-1), logp


def grads(out_lp, out_ent, inputs, g_lp, g_ent):
    loss = (out_lp.double() * g_lp).sum() + ((out_ent.double() * g_ent).sum() if g_ent is not None else 0.0)
    return torch.autograd.grad(loss, [x for x in inputs if x.requires_grad])


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("entropy_grad", [False, True])
def test_values_and_gradients_match_the_plain_computation_in_float64(k, temperature, entropy_grad):
    hidden, weight, ids, g = make(k=k)
    # 7 rows x 13 columns: neither divides N = 30 or V = 50, so every edge tile is partial
    out = hidden_logprobs(hidden, weight, ids, temperature=temperature, topk=4, entropy_grad=entropy_grad,
                          chunk_rows=7, chunk_vocab=13)
    ref_lp, ref_ent, logp = plain(hidden, weight, ids, temperature)
    assert out.logprobs.shape == (30, k) and out.entropy.shape == (30,)
    torch.testing.assert_close(out.logprobs, ref_lp, **F64)
    torch.testing.assert_close(out.entropy, ref_ent, **F64)
    assert torch.equal(out.topk_ids, logp.topk(4, dim=-1).indices)
    assert out.entropy.requires_grad == entropy_grad and not out.topk_ids.requires_grad
    g_lp = torch.randn(30, k, generator=g, dtype=torch.float64)
    g_ent = torch.randn(30, generator=g, dtype=torch.float64) if entropy_grad else None
    ours = grads(out.logprobs, out.entropy, (hidden, weight), g_lp, g_ent)
    ref = grads(ref_lp, ref_ent, (hidden, weight), g_lp, g_ent)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **F64)


def test_entropy_gradient_alone():
    hidden, weight, ids, g = make(k=2)
    out = hidden_logprobs(hidden, weight, ids, entropy_grad=True, chunk_rows=8, chunk_vocab=16)
    _, ref_ent, _ = plain(hidden, weight, ids)
    g_ent = torch.randn(30, generator=g, dtype=torch.float64)
    ours = torch.autograd.grad((out.entropy * g_ent).sum(), [hidden, weight])
    ref = torch.autograd.grad((ref_ent * g_ent).sum(), [hidden, weight])
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **F64)


def test_rows_fewer_than_one_tile_with_default_tiles():
    hidden, weight, ids, g = make(n=3, k=3)
    out = hidden_logprobs(hidden, weight, ids, topk=2)
    ref_lp, ref_ent, logp = plain(hidden, weight, ids)
    torch.testing.assert_close(out.logprobs, ref_lp, **F64)
    torch.testing.assert_close(out.entropy, ref_ent, **F64)
    assert torch.equal(out.topk_ids, logp.topk(2, -1).indices)
    g_lp = torch.randn(3, 3, generator=g, dtype=torch.float64)
    for a, b in zip(grads(out.logprobs, out.entropy, (hidden, weight), g_lp, None),
                    grads(ref_lp, ref_ent, (hidden, weight), g_lp, None)):
        torch.testing.assert_close(a, b, **F64)


def test_confident_row_whose_ids_include_the_argmax_twice_in_float32():
    """p(argmax) ~ 1 - 1e-4: the gradient there, g (1 - p), must not be lost to cancellation. fp32 inputs against
    float64 on the same values: log-probs to 1e-5 absolute, gradients to 1e-4 of their largest entry."""
    hidden, weight, ids, g = make(n=12, h=8, v=40, k=4, dtype=torch.float32)
    with torch.no_grad():
        top = int((hidden[0] @ weight.T).argmax())
        while torch.softmax(hidden[0].double() @ weight.double().T, -1)[top] < 0.9999:
            hidden[0] *= 1.2  # a peaked row
        ids[0] = torch.tensor([top, 3, top, 5])
    out = hidden_logprobs(hidden, weight, ids, chunk_rows=5, chunk_vocab=16)
    ref_lp, ref_ent, logp = plain(hidden, weight, ids)
    assert logp[0].exp().max() > 0.9999
    torch.testing.assert_close(out.logprobs.double(), ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.entropy.double(), ref_ent, atol=1e-5, rtol=0)
    g_lp = torch.randn(12, 4, generator=g, dtype=torch.float64)
    ours = grads(out.logprobs, out.entropy, (hidden, weight), g_lp, None)
    ref = grads(ref_lp, ref_ent, (hidden, weight), g_lp, None)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-4 * b.abs().max().item(), rtol=0)
    peaked, ref_peaked = ours[0][0].double(), ref[0][0].double()  # ~ (1 - p): small, relative to its own size
    torch.testing.assert_close(peaked, ref_peaked, atol=1e-4 * ref_peaked.abs().max().item(), rtol=0)


@pytest.mark.parametrize("tile", [(16, 40), (None, None)])  # accumulated over tiles / one tile (direct matmuls)
def test_bf16_inputs(tile):
    """bf16 hidden and weight (logits rounded to bf16, gradient tiles in bf16, grad_weight summed in fp32) against
    float64 on the same values. Tolerances: log-probs and entropy 0.03 absolute (half a bf16 ulp of logits up to
    ~8); gradients 1% of their norm. The plain bf16 autograd path (bf16 logits) meets the same bounds."""
    hidden, weight, ids, g = make(n=40, h=16, v=96, k=3, dtype=torch.bfloat16)
    out = hidden_logprobs(hidden, weight, ids, temperature=0.8, entropy_grad=True, chunk_rows=tile[0],
                          chunk_vocab=tile[1])
    assert out.logprobs.dtype == torch.float32
    ref_lp, ref_ent, _ = plain(hidden, weight, ids, 0.8)
    assert (out.logprobs.double() - ref_lp).abs().max() < 0.03
    assert (out.entropy.double() - ref_ent).abs().max() < 0.03
    g_lp = torch.randn(40, 3, generator=g, dtype=torch.float64)
    g_ent = torch.randn(40, generator=g, dtype=torch.float64)
    ours = grads(out.logprobs, out.entropy, (hidden, weight), g_lp, g_ent)
    ref = grads(ref_lp, ref_ent, (hidden, weight), g_lp, g_ent)
    logits = (hidden @ weight.T).float() / 0.8  # the plain bf16 path, for scale
    logp = torch.log_softmax(logits, -1)
    naive = grads(logp.gather(1, ids), -(logp.exp() * logp).sum(-1), (hidden, weight), g_lp, g_ent)
    for a, b, c in zip(ours, ref, naive):
        assert a.dtype == torch.bfloat16
        err, err_naive = (a.double() - b).norm() / b.norm(), (c.double() - b).norm() / b.norm()
        assert err < 0.01, (err, err_naive)
        assert err_naive < 0.01


def test_weight_without_grad_and_tied_embedding():
    hidden, weight, ids, g = make(k=2)
    frozen = weight.detach()
    out = hidden_logprobs(hidden, frozen, ids, chunk_rows=8, chunk_vocab=16)
    g_lp = torch.randn(30, 2, generator=g, dtype=torch.float64)
    (gh,) = torch.autograd.grad((out.logprobs * g_lp).sum(), [hidden])
    (ref,) = torch.autograd.grad((plain(hidden, frozen, ids)[0] * g_lp).sum(), [hidden])
    torch.testing.assert_close(gh, ref, **F64)
    out = hidden_logprobs(hidden.detach(), weight, ids, chunk_rows=8, chunk_vocab=16)  # only the weight
    (gw,) = torch.autograd.grad((out.logprobs * g_lp).sum(), [weight])
    (ref,) = torch.autograd.grad((plain(hidden.detach(), weight, ids)[0] * g_lp).sum(), [weight])
    torch.testing.assert_close(gw, ref, **F64)
    # the same weight as input embedding and lm_head: autograd sums both uses
    tokens = torch.randint(0, 50, (30,), generator=g)

    def loss(fn):
        h = torch.nn.functional.embedding(tokens, weight) + hidden
        return (fn(h) * g_lp).sum()

    ours = torch.autograd.grad(loss(lambda h: hidden_logprobs(h, weight, ids, chunk_rows=8, chunk_vocab=16).logprobs),
                               [weight, hidden])
    ref = torch.autograd.grad(loss(lambda h: plain(h, weight, ids)[0]), [weight, hidden])
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **F64)


def test_no_grad_keeps_no_autograd_state():
    hidden, weight, ids, _ = make(k=2)
    with torch.no_grad():
        out = hidden_logprobs(hidden, weight, ids, topk=3, entropy_grad=True)
    assert out.logprobs.grad_fn is None and out.entropy.grad_fn is None and not out.logprobs.requires_grad
    torch.testing.assert_close(out.logprobs, plain(hidden, weight, ids)[0], **F64)
    out = hidden_logprobs(hidden.detach(), weight.detach(), ids)  # grad mode on, nothing requires grad
    assert out.logprobs.grad_fn is None and out.topk_ids is None


def test_autocast_computes_in_the_autocast_dtype():
    hidden, weight, ids, g = make(n=16, h=16, v=64, k=2, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = hidden_logprobs(hidden, weight, ids, chunk_rows=8, chunk_vocab=32)
    ref_lp = plain(hidden.bfloat16(), weight.bfloat16(), ids)[0]
    assert (out.logprobs.double() - ref_lp).abs().max() < 0.03
    gh, gw = torch.autograd.grad(out.logprobs.sum(), [hidden, weight])
    assert gh.dtype == gw.dtype == torch.float32


class _LargestOutput(TorchDispatchMode):
    """Records the largest tensor any aten op produces (forward and, on CPU, backward: same thread)."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.matmuls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.matmuls += func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_n_by_v_tensor_forward_or_backward():
    n, h, v = 64, 8, 512
    hidden, weight, ids, g = make(n=n, h=h, v=v, k=3, dtype=torch.float32)
    g_lp = torch.randn(n, 3, generator=g)
    with _LargestOutput() as probe:
        out = hidden_logprobs(hidden, weight, ids, entropy_grad=True, chunk_rows=16, chunk_vocab=64)
        torch.autograd.grad((out.logprobs * g_lp).sum() + out.entropy.sum(), [hidden, weight])
    assert probe.largest <= max(16 * 64, v * h, n * h) < n * v
    assert probe.matmuls == 4 * (n // 16) * (v // 64)  # the backward was seen too: 1 + 3 matmuls per tile
    with _LargestOutput() as naive:  # the probe does see the plain path's [N, V]
        logp = torch.log_softmax(hidden @ weight.T, -1)
        torch.autograd.grad((logp.gather(1, ids) * g_lp).sum(), [hidden, weight])
    assert naive.largest >= n * v


def test_default_tile_shape_from_the_memory_budget():
    rows, cols = tile_shape(32768, 151936)
    assert rows * cols * 4 <= 1.05 * lp_mod.TILE_BYTES and cols % 64 == 0
    assert -(-151936 // cols) * cols - 151936 < cols // 2  # the last vocabulary tile is not a sliver
    assert tile_shape(5, 151936) == (5, 151936)
    assert tile_shape(100, 50, 7, None) == (7, 50)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_peak_memory_and_values(compiled):
    """bf16 on a GPU: peak memory above the inputs stays below grads + fp32 accumulators + 3 tiles, far below the
    [N, V] bf16 logits (512 MiB here); values as the eager path / float64 within bf16 tolerance."""
    n, h, v, k = 8192, 1024, 32768, 4
    torch.manual_seed(0)
    hidden = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(v, h, device="cuda") / h**0.5).to(torch.bfloat16).requires_grad_()
    ids = torch.randint(0, v, (n, k), device="cuda")
    g_lp = torch.randn(n, k, device="cuda")
    rows, cols = 2048, 2048
    hidden_logprobs(hidden, weight, ids, chunk_rows=rows, chunk_vocab=cols, compiled=compiled)  # compile, warm up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = hidden_logprobs(hidden, weight, ids, chunk_rows=rows, chunk_vocab=cols, compiled=compiled)
    gh, gw = torch.autograd.grad((out.logprobs * g_lp).sum(), [hidden, weight])
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    allowed = gh.numel() * 2 + gw.numel() * 2 + n * h * 4 + cols * h * 4 + 3 * rows * cols * 4 + (16 << 20)
    assert peak < allowed < n * v * 2
    ref = plain(hidden[:256], weight, ids[:256])[0]
    assert (out.logprobs[:256].double() - ref).abs().max() < 0.05
    assert not (compiled and (lp_mod._COMPILED["fold"].failed or lp_mod._COMPILED["grad"].failed))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_bf16_gradients_against_float64(compiled):
    """The CUDA paths (fp32-output addmm accumulation, compiled tile bodies) on bf16: log-probs within 0.03 of
    float64 on the same values, entropy too, gradients within 1% of their norm; several row blocks and vocabulary
    slices, none dividing evenly."""
    n, h, v, k = 1000, 256, 8000, 3
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, h, device="cuda", generator=gen).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(v, h, device="cuda", generator=gen) / h**0.5).to(torch.bfloat16).requires_grad_()
    ids = torch.randint(0, v, (n, k), device="cuda", generator=gen)
    ids[:, 2] = ids[:, 0]
    g_lp = torch.randn(n, k, device="cuda", generator=gen, dtype=torch.float64)
    g_ent = torch.randn(n, device="cuda", generator=gen, dtype=torch.float64)
    out = hidden_logprobs(hidden, weight, ids, temperature=0.7, topk=5, entropy_grad=True, chunk_rows=384,
                          chunk_vocab=3000, compiled=compiled)
    ref_lp, ref_ent, logp = plain(hidden, weight, ids, 0.7)
    assert (out.logprobs.double() - ref_lp).abs().max() < 0.03
    assert (out.entropy.double() - ref_ent).abs().max() < 0.03
    # bf16 rounding and ties may swap near-equal ids: compare the exact logits at our top-5 with the exact top-5
    best = logp.topk(5, -1).values
    assert (logp.gather(1, out.topk_ids) - best).abs().max() < 0.06  # one bf16 ulp of logits ~4, over T
    for a, b in zip(grads(out.logprobs, out.entropy, (hidden, weight), g_lp, g_ent),
                    grads(ref_lp, ref_ent, (hidden, weight), g_lp, g_ent)):
        assert a.dtype == torch.bfloat16
        assert (a.double() - b.double()).norm() / b.double().norm() < 1e-2
    assert not (compiled and (lp_mod._COMPILED["fold"].failed or lp_mod._COMPILED["grad"].failed))


@pytest.mark.slow
def test_compiled_tile_bodies_equal_eager_on_cpu():
    """The torch.compile path (what CUDA uses by default) against eager, on CPU (inductor's C++ backend; slow)."""
    hidden, weight, ids, g = make(n=40, h=16, v=96, k=3, dtype=torch.float32)
    g_lp = torch.randn(40, 3, generator=g)
    res = []
    for compiled in (False, True):
        out = hidden_logprobs(hidden, weight, ids, temperature=0.9, entropy_grad=True, topk=2, chunk_rows=16,
                              chunk_vocab=40, compiled=compiled)
        res.append((out.logprobs, out.entropy, out.topk_ids,
                    *torch.autograd.grad((out.logprobs * g_lp).sum() + out.entropy.sum(), [hidden, weight])))
    assert not lp_mod._COMPILED["fold"].failed and not lp_mod._COMPILED["grad"].failed
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
