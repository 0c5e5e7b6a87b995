"""Shared-prompt packing against the padded unshared computation it replaces.

The reference is `models.batching.pack`: every response with its own left-padded copy of the prompt. Packed
results must equal it to float32 tolerance: log-probs, entropies and gradients within atol 1e-5 (relative 1e-4 for
gradients, whose sums run in another order), top-k ids exactly; mRoPE positions are integers and must be equal.
"""

from __future__ import annotations

import pytest
import torch

from conftest import TINY, make_text_sample, make_video, make_video_sample
from models.batching import pack
from models.chat import ChatRenderer
from models.factory import TinyModelSpec, build_model, vision_layout
from models.packing import allowed, budget_batches, pack_shared, shared_prompt_groups
from models.policy_head import LogprobModel

LOGPROB_ATOL = 1e-5
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-5


def _model(family: str, tokenizer, seed: int = 1, **dsa):
    torch.manual_seed(0)
    model = build_model(TinyModelSpec(family=family, **TINY), tokenizer, seed=seed)
    if dsa:
        from models.dsa.attach import attach_dsa

        attach_dsa(model, **dsa)
    return model.eval()


def _groups(tokenizer, renderer, video: bool, sizes=(3, 1, 2), seed: int = 0):
    """Prompts (one per row, repeated G times per group), responses of mixed lengths (one empty), group keys."""
    gen = torch.Generator().manual_seed(seed)
    texts = ["What is 2 + 3?", "Where is the needle? line one line two line three", "Call the tool, please."]
    prompts, responses, keys = [], [], []
    for g, size in enumerate(sizes):
        if video and g != 1:
            sample = make_video_sample(make_video(n_frames=4, size=32, seed=g), sid=f"v{g}")
        else:
            sample = make_text_sample(texts[g % len(texts)], sid=f"t{g}")
        prompt = renderer.render(sample.messages)
        for i in range(size):
            n = 0 if (g, i) == (0, 1) else int(torch.randint(1, 7, (1,), generator=gen))
            responses.append(torch.randint(5, min(len(tokenizer), 500), (n,), generator=gen).tolist())
            prompts.append(prompt)
            keys.append(g)
    return prompts, responses, keys


def _ids(responses, t_len: int, vocab: int, extra: int = 3) -> torch.Tensor:
    """`[B, T, 1 + extra]`: the sampled token, then `extra` other ids (a teacher's top-k support)."""
    gen = torch.Generator().manual_seed(7)
    out = torch.randint(0, vocab, (len(responses), t_len, 1 + extra), generator=gen)
    for i, r in enumerate(responses):
        out[i, : len(r), 0] = torch.tensor(r, dtype=torch.long)
    return out


# ---------------------------------------------------------------------- the mask and the layout


def test_mask_is_prompt_plus_own_response():
    """Two groups (prompt 3 + responses of 2 and 1; prompt 2 + a response of 2): every (q, k) pair by hand."""
    from models.chat import RenderedPrompt

    a, b = RenderedPrompt([1, 2, 3], [0, 0, 0]), RenderedPrompt([4, 5], [0, 0])
    batch = pack_shared([a, a, b], [[10, 11], [12], [13, 14]], keys=[0, 0, 1])
    # flat layout: a a a r0 r0 r1 | b b r2 r2
    owner = ["a", "a", "a", "r0", "r0", "r1", "b", "b", "r2", "r2"]
    prompt_of = {"r0": "a", "r1": "a", "r2": "b", "a": "a", "b": "b"}
    expected = torch.zeros(10, 10, dtype=torch.bool)
    for q in range(10):
        for k in range(q + 1):
            same_group = prompt_of[owner[q]] == prompt_of[owner[k]]
            expected[q, k] = same_group and (owner[k] in ("a", "b") or owner[k] == owner[q])
    assert torch.equal(batch.dense_mask()[0, 0], expected)
    assert batch.text_positions.tolist() == [0, 1, 2, 3, 4, 3, 0, 1, 2, 3]
    assert batch.predict_index.tolist() == [[2, 3], [2, 0], [7, 8]]
    assert batch.response_tokens().tolist() == [[10, 11], [12, 0], [13, 14]]
    # the mask_mod FlexAttention gets is the same function on index tensors
    q, k = torch.tensor(4), torch.tensor(5)
    s, br = batch.segment_ids, batch.branch_ids
    assert not bool(allowed(k, q, s[k], s[q], br[k], br[q]))  # r1 does not see r0


def test_groups_need_the_same_key_and_an_identical_prompt():
    from models.chat import RenderedPrompt

    a, a2, b = RenderedPrompt([1, 2], [0, 0]), RenderedPrompt([1, 2], [0, 0]), RenderedPrompt([1, 3], [0, 0])
    assert shared_prompt_groups([a, a2, b, a, a], [0, 0, 0, 1, 0]) == [[0, 1, 4], [2], [3]]


def test_budget_batches_keep_groups_whole():
    units = [[0, 1, 2], [3], [4, 5], [6, 7, 8, 9]]
    tokens = [30, 5, 12, 100]
    batches = budget_batches(units, tokens, budget=40)
    assert sorted(r for b in batches for r in b) == list(range(10))
    for unit in units:  # every group inside exactly one batch
        assert sum(set(unit) <= set(b) for b in batches) == 1
    assert [6, 7, 8, 9] in batches  # over the budget: a batch of its own
    for b in batches:
        if b != [6, 7, 8, 9]:
            assert sum(t for u, t in zip(units, tokens) if set(u) <= set(b)) <= 40
    assert sorted(budget_batches(units, tokens, budget=1000, max_rows=4)) == [[0, 1, 2, 3], [4, 5], [6, 7, 8, 9]]


# ---------------------------------------------------------------------- mRoPE positions


@pytest.mark.parametrize("tokenizer_kind", ["project", "qwen3"])
def test_mrope_positions_of_a_packed_video_group_equal_each_sequence_alone(tokenizer_kind, request):
    tokenizer = request.getfixturevalue(f"{tokenizer_kind}_tokenizer")
    model = _model("qwen3_vl_moe", tokenizer)
    renderer = ChatRenderer(tokenizer, vision_layout(model))
    prompts, responses, keys = _groups(tokenizer, renderer, video=True)
    batch = pack_shared(prompts, responses, keys)
    packed = batch.position_ids(model)  # [3, 1, L]
    assert packed.shape == (3, 1, batch.num_tokens)
    for row, (p, r) in enumerate(zip(prompts, responses)):
        alone = torch.tensor(p.input_ids + r)[None]
        types = torch.tensor(p.mm_token_type_ids + [0] * len(r))[None]
        grid = p.video_grid_thw.clone() if p.has_video else None
        want, _ = model.model.get_rope_index(alone, types, video_grid_thw=grid) if p.has_video else (
            torch.arange(alone.shape[1]).view(1, 1, -1).expand(3, 1, -1), None)
        span = next(s for s in batch.spans if row in s.rows)
        got_prompt = packed[:, 0, span.start : span.start + span.prompt_len]
        assert torch.equal(got_prompt, want[:, 0, : len(p.input_ids)])
        start = span.response_starts[span.rows.index(row)]
        assert torch.equal(packed[:, 0, start : start + len(r)], want[:, 0, len(p.input_ids) :])
    assert any(p.has_video for p in prompts) and any(not p.has_video for p in prompts)


# ---------------------------------------------------------------------- log-probs and gradients, model level


def _forward_both(model, prompts, responses, keys, pad_id, topk=2):
    lm = LogprobModel(model)
    t_len = max(len(r) for r in responses)
    ids = _ids(responses, t_len, model.get_output_embeddings().weight.shape[0])
    padded = lm(pack(prompts, responses, pad_id, response_len=t_len), ids, topk=topk)
    shared = lm(pack_shared(prompts, responses, keys, response_len=t_len), ids, topk=topk)
    return padded, shared


@pytest.mark.parametrize("family,video", [("qwen3_vl_moe", True), ("qwen3_vl_moe", False), ("qwen3_moe", False)])
def test_packed_logprobs_equal_padded(any_tokenizer, family, video):
    kind, tokenizer, template = any_tokenizer
    model = _model(family, tokenizer)
    renderer = ChatRenderer(tokenizer, vision_layout(model), template)
    prompts, responses, keys = _groups(tokenizer, renderer, video)
    mask = torch.zeros(len(responses), max(len(r) for r in responses))
    for i, r in enumerate(responses):
        mask[i, : len(r)] = 1
    with torch.no_grad():
        padded, shared = _forward_both(model, prompts, responses, keys, tokenizer.pad_token_id)
    torch.testing.assert_close(shared.logprobs * mask[..., None], padded.logprobs * mask[..., None],
                               rtol=0, atol=LOGPROB_ATOL)
    torch.testing.assert_close(shared.entropy * mask, padded.entropy * mask, rtol=0, atol=LOGPROB_ATOL)
    assert torch.equal(shared.topk_ids * mask[..., None].long(), padded.topk_ids * mask[..., None].long())


@pytest.mark.parametrize("video", [True, False])
def test_packed_gradients_equal_padded(project_tokenizer, video):
    """A loss over every read log-prob: the prompt's one copy gets the gradients of all its responses."""
    model = _model("qwen3_vl_moe", project_tokenizer).train()
    renderer = ChatRenderer(project_tokenizer, vision_layout(model))
    prompts, responses, keys = _groups(project_tokenizer, renderer, video)
    grads = []
    for packed in (False, True):
        model.zero_grad(set_to_none=True)
        lm = LogprobModel(model)
        t_len = max(len(r) for r in responses)
        ids = _ids(responses, t_len, len(project_tokenizer))
        batch = (pack_shared(prompts, responses, keys, response_len=t_len) if packed
                 else pack(prompts, responses, project_tokenizer.pad_token_id, response_len=t_len))
        out = lm(batch, ids, entropy_grad=True)
        weights = torch.linspace(0.5, 1.5, ids.shape[-1])
        loss = ((out.logprobs * weights).sum(-1) * batch.response_mask).sum() + (out.entropy * batch.response_mask).sum()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=name)


def test_dsa_sparse_attention_packed_equals_padded(project_tokenizer):
    """The DSA reference path (indexer top-k over each query's allowed keys, then sparse attention) sees the
    prompt plus the query's own response under packing, the same keys as alone."""
    model = _model("qwen3_vl_moe", project_tokenizer, topk=6, index_heads=2, index_head_dim=16,
                   dense_when_short=False)
    renderer = ChatRenderer(project_tokenizer, vision_layout(model))
    prompts, responses, keys = _groups(project_tokenizer, renderer, video=True)
    mask = torch.zeros(len(responses), max(len(r) for r in responses))
    for i, r in enumerate(responses):
        mask[i, : len(r)] = 1
    with torch.no_grad():
        padded, shared = _forward_both(model, prompts, responses, keys, project_tokenizer.pad_token_id)
    torch.testing.assert_close(shared.logprobs * mask[..., None], padded.logprobs * mask[..., None],
                               rtol=0, atol=LOGPROB_ATOL)
