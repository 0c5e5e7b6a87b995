"""The transformers rollout engine groups prompts by length into batches and returns results in input order."""

from __future__ import annotations

from models.chat import ChatRenderer
from models.factory import load_model, load_tokenizer, vision_layout
from rollout.base import SamplingSettings
from rollout.hf_engine import HFEngine
from tasks.embedded import generate


def test_length_grouped_batches_return_each_prompt_its_own_answer(workspace):
    path = workspace / "student"
    renderer = ChatRenderer(load_tokenizer(path), vision_layout(load_model(path)), {})
    samples = [s for d in ("tool", "reasoning", "retrieval") for s in generate(d, "eval", 3, seed=4)]
    samples = [samples[i] for i in (0, 3, 6, 1, 4, 7, 2, 5, 8)]  # domains interleaved: lengths unsorted
    prompts = [renderer.render(s.messages, s.tools) for s in samples]
    assert len({len(p.input_ids) for p in prompts}) > 2
    settings = SamplingSettings(max_new_tokens=5, temperature=0.0)
    engine = HFEngine(model_path=str(path), batch_size=4)
    together = engine.generate(prompts, settings)
    assert len({tuple(r) for r in together.response_ids}) > 2  # answers differ, so a mix-up would show
    for i, prompt in enumerate(prompts):
        alone = engine.generate([prompt], settings)
        assert together.response_ids[i] == alone.response_ids[0], f"prompt {i} got another prompt's answer"
        assert together.truncated[i] == alone.truncated[0]
        assert all(abs(a - b) < 1e-4 for a, b in zip(together.logprobs[i], alone.logprobs[0]))


def test_draw_from_probs_matches_the_distribution_and_never_draws_zero_mass():
    """Mass in the first block, across a block border and in the short tail block (1500 = 2 x 512 + 476)."""
    import torch

    from rollout.hf_engine import draw_from_probs

    probs = torch.zeros(1500)
    probs[[3, 511, 512, 1499]] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    torch.manual_seed(0)
    n = 40000
    drawn = torch.cat([draw_from_probs((probs * 7.0).expand(4000, -1).contiguous()) for _ in range(n // 4000)])
    counts = torch.bincount(drawn.squeeze(-1), minlength=1500).float()
    assert counts.sum() == n and set(counts.nonzero().squeeze(-1).tolist()) == {3, 511, 512, 1499}
    # each frequency within 5 standard errors of its probability (rows need not be normalised: x7 above)
    for token, p in [(3, 0.1), (511, 0.2), (512, 0.3), (1499, 0.4)]:
        assert abs(counts[token] / n - p) < 5 * (p * (1 - p) / n) ** 0.5, token


def test_sampled_logprobs_are_the_raw_log_softmax_of_the_drawn_tokens(workspace):
    """What the engine reports must be what the trainer computes for pi_old (log softmax of the raw logits), also
    when temperature and top-p shape the draw."""
    import torch

    from models.batching import pack, response_logits, token_logprobs

    path = workspace / "student"
    model = load_model(path)
    renderer = ChatRenderer(load_tokenizer(path), vision_layout(model), {})
    samples = generate("reasoning", "eval", 3, seed=5)
    prompts = [renderer.render(s.messages, s.tools) for s in samples]
    engine = HFEngine(model=model, batch_size=8)
    for temperature, top_p in [(1.0, 1.0), (0.7, 0.9)]:
        out = engine.generate(prompts, SamplingSettings(max_new_tokens=6, temperature=temperature, top_p=top_p, seed=3))
        for prompt, ids, lps in zip(prompts, out.response_ids, out.logprobs):
            batch = pack([prompt], [ids], pad_id=engine.pad_id)
            with torch.no_grad():
                expected = token_logprobs(response_logits(model, batch), torch.tensor([ids]))[0]
            assert torch.allclose(torch.tensor(lps), expected, atol=1e-4), (temperature, top_p)


def test_sampler_bars_end_of_turn_for_min_new_tokens_and_reports_raw_logprobs():
    """End-of-turn (id 2) dominates the logits, yet cannot be drawn in the first 3 steps; afterwards it is. The
    log-prob reported is the raw log-softmax at the drawn token, end-of-turn's mass included."""
    import torch

    from rollout.hf_engine import _Sampler

    torch.manual_seed(0)
    logits = torch.randn(4, 700)
    logits[:, 2] = 30.0
    sampler = _Sampler(temperature=1.0, top_p=1.0, suppress=[5], eos_id=2, min_new_tokens=3)
    for step in range(5):
        out = sampler(None, logits.clone())
        drawn = out.argmax(-1)
        assert torch.isinf(out).sum() == 4 * 699  # one finite entry per row
        if step < 3:
            assert (drawn != 2).all() and (drawn != 5).all()
        else:
            assert (drawn == 2).all()
        expected = torch.log_softmax(logits, -1).gather(-1, drawn[:, None]).squeeze(-1)
        assert torch.allclose(sampler.logprobs[-1], expected, atol=1e-4)


def test_model_min_new_tokens_is_honoured_when_sampling(workspace):
    """A model whose generation config sets `min_new_tokens` gets at least that many tokens; the log-probs stay
    those of the raw logits."""
    import torch

    from models.batching import pack, response_logits, token_logprobs

    path = workspace / "student"
    model = load_model(path)
    renderer = ChatRenderer(load_tokenizer(path), vision_layout(model), {})
    prompts = [renderer.render(s.messages, s.tools) for s in generate("reasoning", "eval", 4, seed=6)]
    engine = HFEngine(model=model, batch_size=8)
    model.generation_config.min_new_tokens = 12
    forced = engine.generate(prompts, SamplingSettings(max_new_tokens=12, temperature=1.0, seed=1))
    assert all(len(r) == 12 for r in forced.response_ids)
    for prompt, ids, lps in zip(prompts, forced.response_ids, forced.logprobs):
        with torch.no_grad():
            expected = token_logprobs(response_logits(model, pack([prompt], [ids], pad_id=engine.pad_id)),
                                      torch.tensor([ids]))[0]
        assert torch.allclose(torch.tensor(lps), expected, atol=1e-4)


def test_bfloat16_engine_and_teacher_serve_their_own_precision(workspace):
    """`engine_args: {dtype: bfloat16}`: the engine's copy is bf16, synced float32 weights are cast into it, and
    the log-probs it reports are its own (the bf16 model's); they differ from the float32 trainer's by rounding
    only. The teacher likewise. A wrong name is an error naming the key."""
    import pytest
    import torch

    from models.batching import pack, response_logits, token_logprobs
    from teachers.hf_teacher import HFTeacher

    path = workspace / "student"
    model = load_model(path)
    renderer = ChatRenderer(load_tokenizer(path), vision_layout(model), {})
    samples = generate("reasoning", "eval", 3, seed=7)
    prompts = [renderer.render(s.messages, s.tools) for s in samples]
    engine = HFEngine(model_path=str(path), batch_size=8, dtype="bfloat16")
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}
    engine.load_weights({k: v.float() for k, v in model.state_dict().items()})
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}
    out = engine.generate(prompts, SamplingSettings(max_new_tokens=6, temperature=1.0, seed=2))
    for prompt, ids, lps in zip(prompts, out.response_ids, out.logprobs):
        batch = pack([prompt], [ids], pad_id=engine.pad_id)
        with torch.no_grad():
            own = token_logprobs(response_logits(engine.model, batch), torch.tensor([ids]))[0]
            full = token_logprobs(response_logits(model, batch), torch.tensor([ids]))[0]
        assert torch.allclose(torch.tensor(lps), own, atol=1e-3)
        assert torch.allclose(torch.tensor(lps), full, atol=0.1)
    teacher32 = HFTeacher("t", str(path))
    teacher16 = HFTeacher("t", str(path), dtype="bfloat16")
    assert {p.dtype for p in teacher16.model.parameters()} == {torch.bfloat16}
    a, b = teacher32.score(samples, out.response_ids), teacher16.score(samples, out.response_ids)
    assert torch.allclose(a.logprobs, b.logprobs, atol=0.1) and not torch.equal(a.logprobs, b.logprobs)
    with pytest.raises(ValueError, match="rollout.engine_args.dtype"):
        HFEngine(model_path=str(path), dtype="bf16")
