"""The embedded suite: deterministic by seed, stored and read back with `datasets`, and every demonstration
answer scores 1 with its domain's reward while wrong and malformed answers score 0."""

from __future__ import annotations

import numpy as np
import pytest

from rewards.scorer import RewardScorer
from rl.config import RewardsConfig
from tasks.embedded import DOMAINS, EmbeddedTasks, embedded_tokenizer, generate


def _score(samples, completions):
    with RewardScorer(RewardsConfig().routes, num_workers=0) as scorer:
        return scorer.score([
            {"id": s.id, "domain": s.domain, "prompt": "", "completion": c, "reference": s.reference,
             "metadata": s.metadata} for s, c in zip(samples, completions)
        ])


def test_generation_is_deterministic_and_splits_differ():
    for domain in DOMAINS:
        a, b = generate(domain, "train", 5, seed=7), generate(domain, "train", 5, seed=7)
        assert [s.target for s in a] == [s.target for s in b]
        if domain == "video":
            assert all(np.array_equal(x.videos()[0].frames, y.videos()[0].frames) for x, y in zip(a, b))
        held_out = generate(domain, "eval", 5, seed=7)
        assert [s.messages for s in held_out] != [s.messages for s in a]


def test_stored_suite_round_trips(tmp_path):
    source = EmbeddedTasks(data_dir=str(tmp_path), split="eval", seed=3, n_train=4, n_eval=6)
    again = EmbeddedTasks(data_dir=str(tmp_path), split="eval", seed=3, n_train=4, n_eval=6)
    fresh = {d: generate(d, "eval", 6, 3) for d in DOMAINS}
    assert len(source) == 24
    for stored, reread in zip(source, again):
        original = next(s for s in fresh[stored.domain] if s.id == stored.id)
        assert stored.target == original.target == reread.target
        assert stored.reference == original.reference
        assert stored.metadata == original.metadata
        if stored.domain == "video":
            v, o = stored.videos()[0], original.videos()[0]
            assert np.array_equal(v.frames, o.frames) and v.timestamps == o.timestamps and v.captions == o.captions


def test_retrieval_needle_length_and_depth():
    for s in generate("retrieval", "train", 20, seed=1):
        lines = [line for line in s.messages[0]["content"].splitlines() if line.startswith("- ")]
        assert len(lines) == s.metadata["length"]
        position = next(i for i, line in enumerate(lines) if line.startswith(f"- {s.reference['key']}:"))
        assert lines[position] == f"- {s.reference['key']}: {s.reference['value']}"
        assert sum(":" in line for line in lines) == 1  # the only record: the rest is filler
        assert s.metadata["depth"] == pytest.approx(position / max(len(lines) - 1, 1), abs=0.01)


def test_retrieval_distractors_are_other_keys_records():
    for s in generate("retrieval", "train", 20, seed=1, retrieval_lengths=(6,), distractors=2):
        records = [line for line in s.messages[0]["content"].splitlines() if ": " in line and line.startswith("- ")]
        keys = [r[2:].split(":")[0] for r in records]
        assert len(records) == 3 and keys.count(s.reference["key"]) == 1
        assert s.metadata["task"] == "multikey_niah" and s.metadata["length"] == 6


def test_where_keeps_a_sub_distribution(tmp_path):
    kept = EmbeddedTasks(data_dir=str(tmp_path), split="eval", domains=["retrieval", "reasoning"], n_train=4,
                         n_eval=40, where={"length": [2], "task": ["add", "niah"]})
    assert {(s.domain, s.metadata["task"]) for s in kept} == {("retrieval", "niah"), ("reasoning", "add")}
    assert all(s.metadata["length"] == 2 for s in kept if s.domain == "retrieval")
    with pytest.raises(ValueError, match="retrieval/eval: no sample matches"):
        EmbeddedTasks(data_dir=str(tmp_path), split="eval", domains=["retrieval"], n_train=4, n_eval=40,
                      where={"length": [99]})


def test_keys_and_values_tokenise_the_same_in_question_records_and_answer(tmp_path):
    tok = embedded_tokenizer(tmp_path)
    for s in generate("retrieval", "train", 10, seed=2):
        question, *records = s.messages[0]["content"].splitlines()
        answer = tok.tokenize(s.target)
        assert len(answer) == 1  # one value token, copied from the needle
        record = next(r for r in records if r.startswith(f"- {s.reference['key']}:"))
        key_token = tok.tokenize(" " + s.reference["key"])
        assert len(key_token) == 1
        assert key_token[0] in tok.tokenize(question) and key_token[0] in tok.tokenize(record)
        assert answer[0] == tok.tokenize(record)[-1]  # "-", " key", ":", " value"


def test_demonstrations_score_one_and_bad_answers_zero():
    samples = [s for d in DOMAINS for s in generate(d, "eval", 8, seed=5)]
    good = _score(samples, [s.target for s in samples])
    assert good.rewards.tolist() == [1.0] * len(samples)
    bad_answers = {
        "video": "[9, 9.5]", "retrieval": "nothing", "tool": '<tool_call>{"name": "calculator", "arguments":',
        "reasoning": "no idea",
    }
    bad = _score(samples, [bad_answers[s.domain] for s in samples])
    assert bad.rewards.tolist() == [0.0] * len(samples)
    empty = _score(samples, [""] * len(samples))
    assert empty.rewards.tolist() == [0.0] * len(samples)
    assert empty.invalid.all()
