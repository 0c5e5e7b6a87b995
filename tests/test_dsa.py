"""DSA on the CPU reference path: dense equivalence, hand-built selection, gradients, KV-cache decoding,
save/load, indexer training stages, and the 30B-A3B configuration on the meta device."""

from __future__ import annotations

import math

import pytest
import torch

import models.dsa as dsa
from models.dsa.attention import _kl
from models.dsa.reference import allowed_mask, dense_attention_ref, sparse_attention_ref

transformers = pytest.importorskip("transformers")


def _tiny(family: str, seed: int = 0):
    torch.manual_seed(seed)
    if family == "qwen3_vl_moe":
        return transformers.Qwen3VLMoeForConditionalGeneration(dsa.tiny_vl_moe_config()).eval()
    return transformers.AutoModelForCausalLM.from_config(dsa.tiny_text_config(family)).eval()


def _attach(model, topk, **kw):
    kw.setdefault("index_heads", 2)
    kw.setdefault("index_head_dim", 8)
    return dsa.attach_dsa(model, topk=topk, dense_when_short=kw.pop("dense_when_short", False), **kw)


# ---------------------------------------------------------------- dense equivalence
@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe", "qwen3_vl_moe"])
def test_topk_at_least_length_equals_dense_model(family):
    model = _tiny(family)
    ids = torch.randint(0, 100, (2, 24))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        _attach(model, topk=24)  # every query keeps its whole causal set, through the sparse path
        out = model(input_ids=ids).logits
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_sparse_reference_equals_dense_with_padding_and_gqa():
    torch.manual_seed(1)
    b, hq, hkv, lq, lk, d = 2, 6, 2, 9, 13, 8
    q = torch.randn(b, hq, lq, d, dtype=torch.float64)
    k, v = torch.randn(b, hkv, lk, d, dtype=torch.float64), torch.randn(b, hkv, lk, d, dtype=torch.float64)
    pad = torch.ones(b, lk, dtype=torch.long)
    pad[1, :3] = 0  # left padding of the second row
    allowed = allowed_mask(pad, b, lq, lk, q.device)
    scores = torch.randn(b, lq, lk, dtype=torch.float64)
    idx = dsa.topk_indices_ref(scores, allowed, topk=lk)
    out = sparse_attention_ref(q, k, v, idx, 0.3)
    ref, _ = dense_attention_ref(q, k, v, allowed, 0.3)
    assert torch.allclose(out, ref, atol=1e-12)
    # hand check of one entry: query 0 of row 1 sees keys 3..4 (offset lk-lq = 4, padding hides 0..2)
    assert allowed[1, 0].nonzero().flatten().tolist() == [3, 4]
    assert (idx[1, 0] >= 0).sum() == 2


def test_fewer_candidates_than_k_fill_with_minus_one():
    scores = torch.arange(12.0).view(1, 3, 4)
    allowed = allowed_mask(None, 1, 3, 4, scores.device)  # offset 1: query t sees keys 0..t+1
    idx = dsa.topk_indices_ref(scores, allowed, topk=3)
    assert idx.tolist() == [[[1, 0, -1], [2, 1, 0], [3, 2, 1]]]


# ---------------------------------------------------------------- hand-built selection
def test_indexer_picks_the_tokens_it_is_built_to_pick():
    """One index head, q = e0, k(s) = c_s e0: I(t,s) = w * ReLU(c_s). With w > 0 the largest c_s win; with w < 0
    the keys with c_s <= 0 (score 0) beat the rest. The sparse output must equal attention over those keys."""
    lk = 8
    c = torch.tensor([0.5, -1.0, 3.0, 0.1, 2.0, -2.0, 1.0, 0.0])
    qi = torch.zeros(1, 1, 1, 2)
    qi[..., 0] = 1.0
    ki = torch.zeros(1, lk, 2)
    ki[0, :, 0] = c
    allowed = allowed_mask(None, 1, 1, lk, qi.device)  # the last position: sees all 8
    pos = dsa.indexer_scores_ref(qi, ki, torch.ones(1, 1, 1))
    assert pos[0, 0].tolist() == pytest.approx([0.5, 0.0, 3.0, 0.1, 2.0, 0.0, 1.0, 0.0])
    idx = dsa.topk_indices_ref(pos, allowed, topk=3)
    assert sorted(idx[0, 0].tolist()) == [2, 4, 6]
    neg = dsa.indexer_scores_ref(qi, ki, -torch.ones(1, 1, 1))
    idx_neg = dsa.topk_indices_ref(neg, allowed, topk=3)
    assert sorted(idx_neg[0, 0].tolist()) == [1, 5, 7]  # ties at 0 go to the earlier keys
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 4, 1, 4), torch.randn(1, 2, lk, 4), torch.randn(1, 2, lk, 4)
    out = sparse_attention_ref(q, k, v, idx, 0.5)
    only = torch.zeros(1, 1, lk, dtype=torch.bool)
    only[0, 0, [2, 4, 6]] = True
    ref, _ = dense_attention_ref(q, k, v, only, 0.5)
    assert torch.allclose(out, ref, atol=1e-6)


def test_indexer_module_rope_uses_model_positions():
    """Shifting every position by the same amount leaves q.k of the index heads unchanged (relative rotary)."""
    torch.manual_seed(3)
    ix = dsa.LightningIndexer(hidden_size=16, index_heads=2, index_head_dim=8, rope_dim=4).double()
    x = torch.randn(1, 5, 16, dtype=torch.float64)
    inv = 1.0 / (10000 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8))  # head_dim 8 tables

    def tables(shift):
        f = (torch.arange(5, dtype=torch.float64) + shift)[:, None] * inv
        e = torch.cat([f, f], -1)[None]
        return e.cos(), e.sin()

    s0 = dsa.indexer_scores_ref(*ix(x, *tables(0)))
    s7 = dsa.indexer_scores_ref(*ix(x, *tables(7)))
    assert torch.allclose(s0, s7, atol=1e-10)
    q, _, _ = ix(x, *tables(3))
    q0, _, _ = ix(x, *tables(0))
    assert not torch.allclose(q, q0)  # the rotation is applied
    assert torch.allclose(q[..., 4:], q0[..., 4:])  # only to the first rope_dim dims


# ---------------------------------------------------------------- gradients
def test_sparse_attention_gradients_match_finite_differences():
    torch.manual_seed(4)
    q = torch.randn(1, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 7, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 7, 3, dtype=torch.float64, requires_grad=True)
    allowed = allowed_mask(None, 1, 5, 7, q.device)
    idx = dsa.topk_indices_ref(torch.randn(1, 5, 7, dtype=torch.float64), allowed, topk=4)
    assert torch.autograd.gradcheck(lambda a, b, c: sparse_attention_ref(a, b, c, idx, 0.7), (q, k, v))


def test_indexer_kl_gradients_match_finite_differences():
    torch.manual_seed(5)
    qi = torch.randn(1, 4, 2, 3, dtype=torch.float64, requires_grad=True)
    ki = torch.randn(1, 4, 3, dtype=torch.float64, requires_grad=True)
    wi = torch.randn(1, 4, 2, dtype=torch.float64, requires_grad=True)
    allowed = allowed_mask(None, 1, 4, 4, qi.device)
    target = torch.softmax(torch.randn(1, 4, 4, dtype=torch.float64).masked_fill(~allowed, -math.inf), -1)

    def loss(a, b, c):
        return _kl(target, dsa.indexer_scores_ref(a, b, c), allowed).sum()

    assert torch.autograd.gradcheck(loss, (qi, ki, wi))
    # KL is zero exactly when the indexer distribution equals the target
    logits = torch.log(target.clamp_min(1e-300))
    assert _kl(target, logits, allowed).abs().max() < 1e-12


# ---------------------------------------------------------------- KV cache / generate
@pytest.mark.parametrize("family", ["qwen3_moe", "qwen3_vl_moe"])
def test_generate_matches_dense_model_when_k_covers_length(family):
    model = _tiny(family)
    ids = torch.randint(0, 100, (1, 7))
    dense = model.generate(input_ids=ids, max_new_tokens=10, do_sample=False)
    _attach(model, topk=64)
    sparse = model.generate(input_ids=ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(dense, sparse)


def test_cached_decoding_selects_among_all_cached_keys():
    """k < length: every decode step with the cache must give the logits of a full forward without cache."""
    model = _attach(_tiny("qwen3"), topk=3)
    ids = torch.randint(0, 100, (1, 6))
    gen = model.generate(input_ids=ids, max_new_tokens=9, do_sample=False)
    with torch.no_grad():
        full = model(input_ids=gen, use_cache=False).logits
    assert torch.equal(full[0, 5:-1].argmax(-1), gen[0, 6:])
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(input_ids=gen[:, :6], past_key_values=cache, use_cache=True)
        assert torch.allclose(out.logits, full[:, :6], atol=1e-5)
        for t in range(6, gen.shape[1]):
            step = model(input_ids=gen[:, t:t + 1], past_key_values=cache, use_cache=True)
            assert torch.allclose(step.logits[0, -1], full[0, t], atol=1e-5)
    assert cache._dsa_index_keys[0].shape[1] == gen.shape[1]


# ---------------------------------------------------------------- save / load
@pytest.mark.parametrize("family", ["qwen3_moe", "qwen3_vl_moe"])
def test_save_and_load_roundtrip(family, tmp_path):
    model = _attach(_tiny(family), topk=5)
    ids = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    loaded = dsa.load_dsa_model(tmp_path).eval()
    assert loaded.config.dsa == model.config.dsa
    assert set(loaded.state_dict()) == set(model.state_dict())
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, ref, atol=1e-6)


def test_load_rejects_a_model_without_dsa(tmp_path):
    _tiny("qwen3").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no 'dsa' entry"):
        dsa.load_dsa_model(tmp_path)


def test_attach_errors():
    model = _attach(_tiny("qwen3"), topk=4)
    with pytest.raises(ValueError, match="already has DSA"):
        dsa.attach_dsa(model)
    with pytest.raises(ValueError, match="no Qwen3-family text attention"):
        dsa.attach_dsa(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="rope_dim"):
        dsa.attach_dsa(_tiny("qwen3"), index_head_dim=8, rope_dim=6 + 1)
    with pytest.raises(ValueError, match="mode"):
        dsa.set_dsa_mode(model, "sparse-ish")


def test_attach_leaves_other_weights_untouched():
    model = _tiny("qwen3_vl_moe")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _attach(model, topk=4)
    after = model.state_dict()
    assert set(after) - set(before) == {k for k in after if ".indexer." in k}
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all("visual" not in k for k in after if ".indexer." in k)
    assert len(dsa.dsa_attention_modules(model)) == 2


# ---------------------------------------------------------------- training stages
def test_dense_warmup_loss_decreases_and_trains_only_the_indexer():
    torch.manual_seed(6)
    model = _attach(_tiny("qwen3_moe"), topk=4)
    names = dsa.set_trainable_for_mode(model, "dense_warmup")
    assert names and all(".indexer." in n for n in names)
    frozen = {n: p.clone() for n, p in model.named_parameters() if ".indexer." not in n}
    opt = torch.optim.Adam(dsa.indexer_parameters(model), lr=2e-2)
    ids = torch.randint(0, 100, (2, 32))
    losses, masses = [], []
    for _ in range(20):
        loss, metrics = dsa.indexer_kl_loss(model, ids, mode="dense_warmup")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        masses.append(metrics["topk_attention_mass"])
    assert losses[-1] < 0.6 * losses[0]
    assert masses[-1] > masses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(m.dsa_mode == "sparse" and m.dsa_loss_mode is None for m in dsa.dsa_attention_modules(model))


def test_sparse_stage_keeps_the_two_losses_apart():
    """Task loss trains the main model only; the selected-set KL trains the indexer only."""
    model = _attach(_tiny("qwen3_vl_moe"), topk=4)
    names = dsa.set_trainable_for_mode(model, "sparse")
    assert not any(n.startswith("model.visual.") for n in names)
    assert any(".indexer." in n for n in names) and any("q_proj" in n for n in names)
    ids = torch.randint(0, 100, (1, 16))
    kl, metrics, out = dsa.indexer_kl_loss(model, ids, mode="sparse", return_outputs=True, labels=ids)
    assert metrics["indexer_kl"] >= 0
    index_params = dsa.indexer_parameters(model)
    main = [p for n, p in model.named_parameters() if p.requires_grad and ".indexer." not in n]
    g_task = torch.autograd.grad(out.loss, index_params + main, allow_unused=True, retain_graph=True)
    assert all(g is None or not g.any() for g in g_task[:len(index_params)])
    assert any(g is not None and g.abs().sum() > 0 for g in g_task[len(index_params):])
    g_kl = torch.autograd.grad(kl, index_params + main, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in g_kl[:len(index_params)])
    assert all(g is None or not g.any() for g in g_kl[len(index_params):])


def test_training_mode_errors():
    model = _attach(_tiny("qwen3"), topk=4)
    with pytest.raises(ValueError, match="dense_warmup"):
        dsa.indexer_kl_loss(model, torch.zeros(1, 4, dtype=torch.long), mode="warmup")
    with pytest.raises(ValueError, match="no DSA"):
        dsa.indexer_parameters(_tiny("qwen3"))


# ---------------------------------------------------------------- 30B-A3B on meta
def test_30b_a3b_config_on_meta_device():
    cfg = dsa.qwen3_vl_moe_30b_a3b_dsa_config()
    with torch.device("meta"):
        model = transformers.Qwen3VLMoeForConditionalGeneration(cfg)
    dsa.attach_dsa(model, **cfg.dsa)
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    vision = sum(p.numel() for n, p in params.items() if n.startswith("model.visual."))
    experts = sum(p.numel() for n, p in params.items() if ".mlp.experts." in n)
    llm = total - vision
    active = llm - experts + experts * 8 // 128  # 8 of 128 experts per token
    indexer = sum(p.numel() for n, p in params.items() if ".indexer." in n)
    # per layer: wq 2048x(4*64) + wk 2048x64 + LayerNorm 2x64 + weights 2048x4
    assert indexer == 48 * (2048 * 256 + 2048 * 64 + 128 + 2048 * 4)
    assert 30.0e9 < llm < 31.0e9, llm  # Qwen3-30B-A3B: 30.5B total, 3.3B activated
    assert 3.2e9 < active < 3.5e9, active
    assert 0.4e9 < vision < 0.7e9, vision
    assert len(dsa.dsa_attention_modules(model)) == 48
    assert model.config.dsa["topk"] == 2048


def test_dense_below_is_validated_and_saved_with_the_model(tmp_path):
    from models.dsa.config import DSAConfig

    assert DSAConfig().dense_below == 0  # exact top-k semantics unless asked
    assert DSAConfig(dense_below="auto").dense_below == "auto"
    for bad in (-1, "sometimes", 1.5):
        with pytest.raises(ValueError, match="dense_below"):
            DSAConfig(dense_below=bad)
    model = transformers.AutoModelForCausalLM.from_config(dsa.tiny_text_config("qwen3"))
    dsa.attach_dsa(model, topk=4, index_heads=2, index_head_dim=8, dense_below="auto")
    model.save_pretrained(tmp_path)
    assert dsa.load_dsa_model(tmp_path).config.dsa["dense_below"] == "auto"
