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
