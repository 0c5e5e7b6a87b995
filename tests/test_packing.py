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
    # a row of one prompt and one response is plain causal attention (sdpa_flex sends it to sdpa's causal kernel)
    assert not batch.is_one_sequence
    single = pack_shared([a], [[10, 11]], keys=[0])
    assert single.is_one_sequence and torch.equal(single.dense_mask()[0, 0], torch.ones(5, 5, dtype=torch.bool).tril())


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


def test_packed_states_backward_sums_in_a_fixed_order(project_tokenizer):
    """The states that predict a packed batch's response tokens repeat positions (every response of a group starts
    from the prompt's last state; masked slots read position 0), so their backward sums several gradients into
    one row. It must do so in the same order every time: with two CPU threads, advanced indexing's racing adds
    gave a different sum on some runs, and two runs of one Context-RL config ended with different weights."""
    renderer = ChatRenderer(project_tokenizer, vision_layout(_model("qwen3_moe", project_tokenizer)))
    prompts, responses, keys = _groups(project_tokenizer, renderer, False, sizes=(16, 16))
    batch = pack_shared(prompts, responses, keys, response_len=48)
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(1, batch.input_ids.shape[1], 512, generator=gen).requires_grad_()
    upstream = torch.randn(*batch.predict_index.shape, 512, generator=gen)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = []
        for _ in range(8):
            hidden.grad = None
            batch.predicting_states(hidden).backward(upstream)
            grads.append(hidden.grad.clone())
    finally:
        torch.set_num_threads(threads)
    want = torch.zeros_like(hidden[0])  # the sum, each row's terms added in order
    want.index_add_(0, batch.predict_index.reshape(-1), upstream.reshape(-1, 512))
    for g in grads:
        assert torch.equal(g[0], grads[0][0])
    torch.testing.assert_close(grads[0][0], want, rtol=1e-6, atol=1e-5)


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


# ---------------------------------------------------------------------- the policy worker: pi_old, loss, gradients


@pytest.fixture(scope="module")
def qwen3_student(workspace, qwen3_tokenizer):
    """The workspace's student shape with the real Qwen3 tokenizer (151k vocabulary)."""
    from models.factory import save_model

    path = workspace / "student_qwen3"
    if not path.exists():
        save_model(build_model(TinyModelSpec(family="qwen3_vl_moe", **TINY), qwen3_tokenizer, seed=1),
                   qwen3_tokenizer, path)
    return path


ALGORITHMS = {
    "mopd": {"advantage": "mopd", "policy_loss": "gspo_token", "logit_losses": {"teacher_fkl": 0.5}},
    "gspo": {"advantage": "gspo", "policy_loss": "gspo", "kl_coef": 0.05, "entropy_coef": 0.01},
}


def _worker(workspace, name: str, model_path, algorithm: dict, packing: str, **trainer):
    from conftest import job
    from rl.policy import PolicyWorker

    cfg, _ = job(workspace, name, {
        "model": {"path": str(model_path), "tokenizer": "model"},
        "algorithm": algorithm,
        "teachers": [{"name": "vl", "path": str(workspace / "teacher_vl"), "num_workers": 0, "topk": 4,
                      "domains": ["video", "retrieval", "tool", "reasoning"]}],
        "optim": {"lr": 1e-3, "grad_clip": 0.0},
        "trainer": {"packing": packing, "device": "cpu", **trainer},
    })
    worker = PolicyWorker(cfg)
    worker.optimizer.step = lambda *a, **k: None  # keep the weights: the test reads the gradients
    return worker


def _policy_rollouts(worker, template_kwargs, group_size: int = 3, seed: int = 0):
    """A step's record by hand: two video prompts and two text prompts, G responses each (one empty), teacher
    top-k ids/log-probs for the dense MOPD term, group-constant advantages."""
    from rl.rollouts import Rollouts

    renderer = ChatRenderer(worker.tokenizer, vision_layout(worker.lm), template_kwargs)
    gen = torch.Generator().manual_seed(seed)
    samples = [make_video_sample(make_video(seed=1), sid="v1"), make_text_sample("What is 4 + 4?", sid="t1"),
               make_video_sample(make_video(n_frames=2, seed=2), sid="v2", question="When is blue shown?"),
               make_text_sample("Find the needle: alpha beta gamma delta epsilon.", sid="t2", domain="retrieval")]
    rows = [(s, g) for g, s in enumerate(samples) for _ in range(group_size)]
    b, t_len = len(rows), 7
    vocab = len(worker.tokenizer)
    lengths = torch.randint(1, t_len + 1, (b,), generator=gen)
    lengths[1] = 0
    mask = (torch.arange(t_len)[None] < lengths[:, None]).float()
    ids = torch.randint(5, min(vocab, 600), (b, t_len), generator=gen) * mask.long()
    rendered = {s.id: renderer.render(s.messages) for s in samples}
    out = Rollouts(samples=[s for s, _ in rows], prompts=[rendered[s.id] for s, _ in rows],
                   group_ids=torch.tensor([g for _, g in rows]), response_ids=ids, response_mask=mask,
                   sampler_logprobs=torch.zeros(b, t_len), truncated=torch.zeros(b, dtype=torch.bool),
                   completions=[""] * b)
    k = 4
    out.teacher_weights = {"vl": torch.ones(b)}
    out.teacher_topk_ids = {"vl": torch.randint(0, vocab, (b, t_len, k), generator=gen)}
    out.teacher_topk_logprobs = {"vl": torch.log_softmax(torch.randn(b, t_len, k + 1, generator=gen), -1)[..., :k]}
    out.teacher_logprobs = {"vl": -torch.rand(b, t_len, generator=gen) * mask}
    out.advantages = torch.randn(len(samples), generator=gen).repeat_interleave(group_size)[:, None] * mask
    out.loss_mask = mask.clone()
    return out


def _pi_old(worker, rollouts) -> torch.Tensor:
    pi = worker.logprobs(rollouts)
    old = torch.zeros_like(rollouts.response_mask)
    old[pi.rows] = pi.old
    ref = None
    if pi.ref is not None:
        ref = torch.zeros_like(old)
        ref[pi.rows] = pi.ref
    return old, ref


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
@pytest.mark.parametrize("tokenizer_kind", ["project", "qwen3"])
def test_policy_update_with_packing_equals_padded(workspace, request, algorithm, tokenizer_kind):
    """pi_old, the per-step loss and metrics, and the gradient of every parameter: packed micro-batches of a
    small token budget (several per step, groups never split) against padded micro-batches of 2 rows."""
    if tokenizer_kind == "qwen3":
        path, template = request.getfixturevalue("qwen3_student"), {"enable_thinking": False}
    else:
        path, template = workspace / "student", {}
    alg = ALGORITHMS[algorithm]
    padded = _worker(workspace, f"pk_{algorithm}_{tokenizer_kind}_none", path, alg, "none", micro_batch_size=2)
    packed = _worker(workspace, f"pk_{algorithm}_{tokenizer_kind}_shared", path, alg, "shared_prompt",
                     micro_batch_tokens=120)
    rollouts = _policy_rollouts(padded, template)
    micro = packed._my_micro_batches(rollouts)
    assert len(micro) > 1 and all(len(m) % 3 == 0 for m in micro)  # several micro-batches of whole groups
    old_a, ref_a = _pi_old(padded, rollouts)
    old_b, ref_b = _pi_old(packed, rollouts)
    torch.testing.assert_close(old_b, old_a, rtol=0, atol=LOGPROB_ATOL)
    if ref_a is not None:
        torch.testing.assert_close(ref_b, ref_a, rtol=0, atol=LOGPROB_ATOL)
    rollouts.old_logprobs = old_a - 0.01 * rollouts.response_mask  # a small off-policy gap: ratios != 1
    rollouts.ref_logprobs = ref_a
    metrics_a, metrics_b = padded.update(rollouts, 0), packed.update(rollouts, 0)
    assert metrics_a.keys() == metrics_b.keys()
    # every metric is weighted like its loss term, so none depends on how rows fall into micro-batches
    for key in metrics_a:
        assert metrics_b[key] == pytest.approx(metrics_a[key], rel=1e-4, abs=1e-6), key
    grads_a = {n: p.grad for n, p in padded.module.named_parameters() if p.grad is not None}
    grads_b = {n: p.grad for n, p in packed.module.named_parameters() if p.grad is not None}
    assert grads_a.keys() == grads_b.keys() and grads_a
    assert any(float(g.abs().max()) > 0 for g in grads_a.values())
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=name)


# ---------------------------------------------------------------------- teachers


@pytest.mark.parametrize("teacher,view", [("teacher_vl", "native"), ("teacher_text", "text")])
def test_teacher_scores_groups_over_one_prompt_forward(workspace, teacher, view):
    """A teacher (in its own view: the text teacher sees captions instead of the video) scores G responses per
    sample over one prompt copy: the same log-probs and top-k as one padded prompt copy per response."""
    from teachers.hf_teacher import HFTeacher

    samples = [make_video_sample(make_video(seed=3), sid="v"), make_text_sample("What is 1 + 1?", sid="t")]
    rows = [samples[0]] * 3 + [samples[1]] * 2 + [samples[0]]
    gen = torch.Generator().manual_seed(5)
    responses = [torch.randint(5, 500, (n,), generator=gen).tolist() for n in (4, 6, 0, 3, 5, 2)]
    scores = {}
    for packing in ("none", "shared_prompt"):
        t = HFTeacher("t", str(workspace / teacher), view=view, topk=3, packing=packing, batch_tokens=60)
        scores[packing] = t.score(rows, responses)
    a, b = scores["none"], scores["shared_prompt"]
    torch.testing.assert_close(b.logprobs, a.logprobs, rtol=0, atol=LOGPROB_ATOL)
    real = torch.zeros(a.logprobs.shape, dtype=torch.bool)  # the padded path leaves top-k garbage past the end
    for i, r in enumerate(responses):
        real[i, : len(r)] = True
    torch.testing.assert_close(b.topk_logprobs[real], a.topk_logprobs[real], rtol=0, atol=LOGPROB_ATOL)
    assert torch.equal(b.topk_ids[real], a.topk_ids[real])
    assert a.logprobs[0].abs().sum() > 0


# ---------------------------------------------------------------------- whole runs


def _losses(run_dir):
    import json

    return [json.loads(line)["actor/loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_packed_run_resumes_exactly_and_follows_the_padded_run(workspace, monkeypatch):
    """A packed MOPD job (several token-budget micro-batches per step) resumed at step 2 ends as the straight
    run (losses rel 1e-5, weights 1e-5/1e-6, as the unpacked resume test); per-step losses follow the same job
    with packing off (rel 1e-4, as micro-batching does)."""
    from conftest import job, run
    from models.factory import load_model

    import rl.policy

    counts = []
    original = rl.policy.budget_batches
    monkeypatch.setattr(rl.policy, "budget_batches", lambda *a, **k: counts.append(len(b := original(*a, **k))) or b)
    packed = {"trainer": {"packing": "shared_prompt", "micro_batch_tokens": 200, "micro_batch_size": 64}}
    straight = run(job(workspace, "pk_straight", packed))
    assert counts and max(counts) > 1  # the packed path ran, with several micro-batches in a step
    first = run(job(workspace, "pk_resumed", packed, ["trainer.steps=2"]))
    assert len(_losses(first.run_dir)) == 2
    second = run(job(workspace, "pk_resumed", packed))
    assert _losses(second.run_dir) == pytest.approx(_losses(straight.run_dir), rel=1e-5, abs=1e-6)
    a = load_model(straight.run_dir / "final").state_dict()
    b = load_model(second.run_dir / "final").state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    padded = run(job(workspace, "pk_padded", {"trainer": {"packing": "none", "micro_batch_size": 3}}))
    assert _losses(padded.run_dir) == pytest.approx(_losses(straight.run_dir), rel=1e-4, abs=1e-5)


def test_embedded_rl_configs_pack_by_default():
    """Video-RL and Context-RL (long prompt, G short answers) run with shared-prompt packing; a DSA indexer
    stage falls back to the padded path under 'auto'."""
    from pathlib import Path

    from rl.config import load_config
    from rl.microbatch import resolve_packing

    root = Path(__file__).resolve().parents[1] / "configs"
    for name in ("video_rl_tiny.yaml", "context_rl_tiny.yaml"):
        cfg, _ = load_config(root / name)
        assert resolve_packing(cfg) == "shared_prompt", name
    cfg, _ = load_config(root / "context_rl_tiny.yaml", ["trainer.packing=auto"])
    assert resolve_packing(cfg) == "shared_prompt"
    cfg.model.dsa.enabled, cfg.model.dsa.stage = True, "sparse"
    assert resolve_packing(cfg) == "none"
    cfg, _ = load_config(root / "mopd_tiny.yaml")  # one response per prompt: nothing to share, the padded path
    assert cfg.rollout.group_size == 1 and resolve_packing(cfg) == "none"


def test_attention_choice_auto_is_sdpa_flex_only_for_packed_cuda_forwards():
    from models.packing import resolve_attention

    assert resolve_attention("auto", "cuda", packed=True) == "sdpa_flex"
    assert resolve_attention("auto", torch.device("cuda", 1), packed=True) == "sdpa_flex"
    assert resolve_attention("auto", "cpu", packed=True) is None  # CPU: the dense mask through sdpa
    assert resolve_attention("auto", "cuda", packed=False) is None  # padded rows: the model's causal sdpa
    assert resolve_attention("auto", "cuda", packed=True, dsa=True) is None  # DSA reads the dense mask
    assert resolve_attention("eager", "cpu", packed=False) == "eager"
    with pytest.raises(ValueError, match="not one of"):
        resolve_attention("flash", "cuda", packed=True)


def test_model_attention_key_sets_the_students_and_teachers_attention(workspace):
    """`model.attention` reaches the policy worker's student, `engine_args.attention` the HF teacher; eager
    attention over the packed 4-D mask gives sdpa's log-probs."""
    from teachers.hf_teacher import HFTeacher

    alg = {"advantage": "gspo", "policy_loss": "gspo"}
    sdpa = _worker(workspace, "attn_sdpa", workspace / "student", alg, "shared_prompt", micro_batch_tokens=120)
    eager = _worker(workspace, "attn_eager", workspace / "student", alg, "shared_prompt", micro_batch_tokens=120)
    eager.cfg.model.attention = "eager"
    from rl.policy import PolicyWorker

    eager = PolicyWorker(eager.cfg)
    assert eager.lm.config.get_text_config()._attn_implementation == "eager"
    assert sdpa.lm.config.get_text_config()._attn_implementation == "sdpa"
    rollouts = _policy_rollouts(sdpa, {})
    torch.testing.assert_close(_pi_old(eager, rollouts)[0], _pi_old(sdpa, rollouts)[0], rtol=0, atol=LOGPROB_ATOL)
    teacher = HFTeacher("t", str(workspace / "teacher_vl"), attention="eager")
    assert teacher.model.config.get_text_config()._attn_implementation == "eager"


def test_the_packing_benchmark_runs_at_small_size():
    """`bench/bench_packing.py --small` (the CPU command bench/README.md gives) prints both paths' rows, with the
    packed path forwarding each prompt once: 64 + 8 x 8 tokens where the padded path forwards 8 x (64 + 8)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "bench/bench_packing.py", "--small", "--threads", "1", "--prompts", "64",
                          "--answers", "8", "--phases", "pi_old", "--reps", "1"],
                         cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {cells[3]: cells for line in out.stdout.splitlines() if line.startswith("| 64 ")
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}
    assert rows["padded"][6] == "576" and rows["packed"][6] == "128"
