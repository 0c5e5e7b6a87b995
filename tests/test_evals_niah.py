"""Needle-in-a-haystack generation (fit to length, depth, variants) and its scoring breakdowns."""

import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from evals import niah
from evals.score import format_table, score_generations

QWEN = Path(__file__).resolve().parents[2] / "shared" / "data" / "qwen_tokenizer"


class WordTokenizer:
    """One token per whitespace-separated word: lets tests count tokens by hand."""

    def __call__(self, text):
        return SimpleNamespace(input_ids=text.split())


NEEDLE_RE = re.compile(r"One of the special magic \w+ for (\S+) is: (\S+)\.")


def test_prompt_is_the_longest_that_fits_and_needle_sits_at_depth():
    tok = WordTokenizer()
    for depth in (0.0, 0.5, 1.0):
        built = niah.build_sample(tok, 300, depth, rng=__import__("random").Random(1))
        assert 300 - 5 < built["tokens"] <= 300  # one more noise sentence (<= 5 words) would not fit
        context = built["prompt"].split("afterwards.\n", 1)[1].rsplit("\nWhat are", 1)[0]
        sentences = re.split(r"(?<=\.) ", context)
        at = next(i for i, s in enumerate(sentences) if s.startswith("One of the special magic"))
        assert at == round(depth * (len(sentences) - 1))
        assert NEEDLE_RE.search(built["prompt"]).group(2) == built["expected"][0]
        assert re.fullmatch(r"\d{7}", built["expected"][0])


def test_variants_and_value_types():
    tok, rng = WordTokenizer(), __import__("random").Random(0)
    multikey = niah.build_sample(tok, 400, 0.5, "multikey", "word", num_distractors=3, rng=rng)
    found = NEEDLE_RE.findall(multikey["prompt"])
    assert len(found) == 4 and len({k for k, _ in found}) == 4 and len(multikey["expected"]) == 1
    assert (multikey["keys"][0], multikey["expected"][0]) in found
    multivalue = niah.build_sample(tok, 400, 0.5, "multivalue", "uuid", num_values=3, rng=rng)
    found = NEEDLE_RE.findall(multivalue["prompt"])
    assert len(found) == 3 and {k for k, _ in found} == set(multivalue["keys"])
    assert all(re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", v)
               for v in multivalue["expected"])
    multiquery = niah.build_sample(tok, 400, 0.5, "multiquery", "number", num_queries=3, rng=rng)
    question = multiquery["prompt"].rsplit("\n", 1)[1]
    assert all(k in question for k in multiquery["keys"]) and len(multiquery["expected"]) == 3
    needles = niah.build_sample(tok, 400, 0.5, "single", "number", haystack="needles", rng=rng)
    assert len(NEEDLE_RE.findall(needles["prompt"])) > 20  # the haystack itself is distractor needles
    assert "The grass is green." not in needles["prompt"]


def test_bad_configuration_is_rejected():
    with pytest.raises(ValueError, match="unknown NIAH variant"):
        niah.build_sample(WordTokenizer(), 300, 0.5, "multihop")
    with pytest.raises(ValueError, match="shorter than the bare prompt"):
        niah.build_sample(WordTokenizer(), 10, 0.5)


def test_answer_score_is_the_fraction_of_values_recalled():
    assert niah.answer_score("The numbers are 1234567 and 7654321.", ["1234567", "7654321"]) == 1.0
    assert niah.answer_score("It is 1234567.", ["1234567", "7654321"]) == 0.5
    assert niah.answer_score("BOLD-ANCHOR", ["bold-anchor"]) == 1.0
    assert niah.answer_score("", ["x"]) == 0.0


def test_source_and_report_per_length_and_depth():
    source = niah.NIAHSource(tokenizer=WordTokenizer(), lengths=[200, 400], depths=[0.0, 1.0], seed=3)
    samples = list(source)
    assert len(samples) == 4 and [s.metadata["length"] for s in samples] == [200, 200, 400, 400]
    again = niah.NIAHSource(tokenizer=WordTokenizer(), lengths=[200, 400], depths=[0.0, 1.0], seed=3)
    assert [s.reference for s in again] == [s.reference for s in samples]  # seeded
    answers = [s.reference["values"][0] if s.metadata["depth"] == 0.0 else "no idea" for s in samples]
    answers[2] = "no idea"  # length 400, depth 0 also wrong
    m = score_generations("niah", samples, answers)
    assert m["score"] == 25.0 and m["n"] == 4
    assert m["by_length"] == {"200": {"score": 50.0, "n": 2}, "400": {"score": 0.0, "n": 2}}
    assert m["by_depth"] == {"0.0": {"score": 50.0, "n": 2}, "1.0": {"score": 0.0, "n": 2}}
    assert "length=200" in format_table(m)


@pytest.fixture(scope="module")
def qwen_tokenizer(tmp_path_factory):
    if not (QWEN / "vocab.json").is_file():
        pytest.skip("shared Qwen tokenizer files absent")
    folder = tmp_path_factory.mktemp("qwen_tok")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(QWEN / name, folder / name)
    shutil.copy(QWEN / "qwen3" / "tokenizer_config.json", folder / "tokenizer_config.json")
    return str(folder)


def test_fitted_with_the_real_qwen_tokenizer(qwen_tokenizer):
    source = niah.NIAHSource(tokenizer=qwen_tokenizer, lengths=[1024, 2048], depths=[0.25],
                             variants=["single", "multikey"], value_types=["uuid"], haystacks=["noise", "needles"])
    tok = niah.load_tokenizer(qwen_tokenizer)
    assert len(source) == 8
    for sample in source:
        tokens = niah.count_tokens(tok, sample.messages[0]["content"])
        assert tokens == sample.metadata["tokens"]
        assert sample.metadata["length"] - 60 < tokens <= sample.metadata["length"]
