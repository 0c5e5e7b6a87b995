"""Needle in a haystack, RULER-style (Hsieh et al., 2024), generated: no data files needed.

A haystack of noise sentences ("The grass is green. ...") or of distractor needles hides needle sentences
"One of the special magic {kind} for {key} is: {value}." at a configured depth; the prompt is fitted to a target
token length with the model's own tokenizer. Variants (RULER's names):
- `single`: one needle; `multikey`: the needle plus distractor needles with other keys;
- `multivalue`: one key with several values; `multiquery`: several keys, all asked for.
Values (and keys) are words, 7-digit numbers or UUIDs. The score of an answer is the fraction of expected values
that occur in it (case-insensitive), RULER's `string_match_all`; reports break it down per length and depth.
"""

from __future__ import annotations

import random
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any
from collections.abc import Iterator, Sequence

from evals.io import PredictionsError, read_jsonl
from tasks.base import Sample, TaskSource, register_task_source

VARIANTS = ("single", "multikey", "multivalue", "multiquery")
VALUE_TYPES = ("word", "number", "uuid")
HAYSTACKS = ("noise", "needles")
NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
PLURAL = {"word": "words", "number": "numbers", "uuid": "uuids"}
TEMPLATE = (
    "Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {kind} afterwards.\n{context}\n"
    "What are all the special magic {kind} for {query} mentioned in the provided text?"
)
NEEDLE = "One of the special magic {kind} for {key} is: {value}."

ADJECTIVES = (
    "able", "ancient", "bitter", "bold", "brave", "bright", "broad", "calm", "cheap", "clean", "clever", "cold",
    "cool", "crisp", "cruel", "curly", "damp", "dark", "deep", "dense", "dry", "dull", "eager", "early", "empty",
    "faint", "fair", "fancy", "fast", "fierce", "flat", "fresh", "gentle", "giant", "glad", "golden", "grand",
    "green", "grim", "happy", "harsh", "heavy", "hollow", "huge", "humble", "icy", "jolly", "keen", "kind", "large",
    "lazy", "light", "little", "lively", "loud", "lucky", "mellow", "mighty", "modern", "narrow", "neat", "noble",
    "odd", "old", "pale", "plain", "polite", "proud", "purple", "quick", "quiet", "rapid", "rare", "rich", "rough",
    "round", "royal", "rusty", "sharp", "shiny", "silent", "silver", "simple", "slow", "small", "smooth", "soft",
    "solid", "sour", "steep", "sticky", "stout", "strange", "sweet", "swift", "tall", "tame", "tender", "thick",
    "tidy", "tiny", "vast", "warm", "weak", "wide", "wild", "wise", "young", "zany", "zealous",
)
NOUNS = (
    "anchor", "apple", "arrow", "badge", "banjo", "barrel", "beacon", "bell", "blanket", "bottle", "bridge",
    "bucket", "button", "cabin", "camera", "candle", "canyon", "carpet", "castle", "cello", "chair", "cherry",
    "circle", "cliff", "clock", "cloud", "comet", "compass", "copper", "cottage", "crayon", "crystal", "desert",
    "dolphin", "dragon", "drum", "eagle", "engine", "falcon", "feather", "fence", "fiddle", "forest", "fountain",
    "garden", "glacier", "guitar", "hammer", "harbor", "helmet", "island", "jacket", "jungle", "kettle", "ladder",
    "lantern", "lemon", "lizard", "magnet", "maple", "meadow", "mirror", "mountain", "needle", "ocean", "orchard",
    "otter", "paddle", "panther", "parrot", "pebble", "pencil", "piano", "pillow", "planet", "pocket", "puzzle",
    "rabbit", "racket", "river", "rocket", "saddle", "sandal", "signal", "spider", "spoon", "statue", "storm",
    "summit", "teapot", "thunder", "ticket", "tiger", "tower", "trumpet", "tunnel", "turtle", "umbrella",
    "valley", "violin", "wagon", "walrus", "whistle", "window", "wizard", "zebra",
)

Tokenizer = Any  # an HF tokenizer: `tok(text).input_ids` is the token id list


def _make(kind: str, rng: random.Random) -> str:
    if kind == "word":
        return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
    if kind == "number":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle type {kind!r}; choose from {VALUE_TYPES}")


def _distinct(kind: str, count: int, rng: random.Random, taken: set[str]) -> list[str]:
    out = []
    while len(out) < count:
        item = _make(kind, rng)
        if item not in taken:
            taken.add(item)
            out.append(item)
    return out


def _join_keys(keys: Sequence[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + f", and {keys[-1]}"


def count_tokens(tokenizer: Tokenizer, text: str) -> int:
    """Token count of `text` with the model's tokenizer (no special tokens beyond what it adds by default)."""
    return len(tokenizer(text).input_ids)


def build_sample(tokenizer: Tokenizer, length: int, depth: float, variant: str = "single",
                 value_type: str = "number", key_type: str = "word", haystack: str = "noise",
                 num_distractors: int = 3, num_values: int = 4, num_queries: int = 4,
                 rng: random.Random | None = None) -> dict[str, Any]:
    """One haystack prompt fitted to at most `length` tokens, needles at `depth` (0 = start, 1 = end).

    Returns `{"prompt", "expected" (values), "keys", "tokens" (prompt token count), "needle_positions"}`.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown NIAH variant {variant!r}; choose from {VARIANTS}")
    if haystack not in HAYSTACKS:
        raise ValueError(f"unknown haystack {haystack!r}; choose from {HAYSTACKS}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = rng or random.Random(0)
    kind = PLURAL[value_type]
    taken: set[str] = set()
    n_keys = num_queries if variant == "multiquery" else 1
    keys = _distinct(key_type, n_keys, rng, taken)
    per_key = num_values if variant == "multivalue" else 1
    needles = []
    for key in keys:
        for value in _distinct(value_type, per_key, rng, taken):
            needles.append((key, value))
    distractors = []
    if variant == "multikey":
        for key in _distinct(key_type, num_distractors, rng, taken):
            distractors.append(NEEDLE.format(kind=kind, key=key, value=_distinct(value_type, 1, rng, taken)[0]))
    query = _join_keys(keys)
    needle_text = [NEEDLE.format(kind=kind, key=k, value=v) for k, v in needles]

    def filler(i: int) -> str:
        if haystack == "noise":
            return NOISE[i % len(NOISE)]
        while len(pool) <= i:
            key = _distinct(key_type, 1, rng, taken)[0]
            pool.append(NEEDLE.format(kind=kind, key=key, value=_distinct(value_type, 1, rng, taken)[0]))
        return pool[i]

    pool: list[str] = []
    distractor_slots = [rng.random() for _ in distractors]

    def render(n: int) -> tuple[str, list[int]]:
        units = [filler(i) for i in range(n)]
        for slot, sentence in sorted(zip(distractor_slots, distractors)):
            units.insert(round(slot * len(units)), sentence)
        at = round(depth * len(units))
        units[at:at] = needle_text
        return " ".join(units), list(range(at, at + len(needle_text)))

    def prompt_of(n: int) -> tuple[str, list[int]]:
        context, positions = render(n)
        return TEMPLATE.format(kind=kind, context=context, query=query), positions

    base = count_tokens(tokenizer, prompt_of(0)[0])
    if base > length:
        raise ValueError(f"target length {length} is shorter than the bare prompt ({base} tokens)")
    per_unit = max(1, count_tokens(tokenizer, " ".join(filler(i) for i in range(20))) // 20)
    lo, hi = 0, (length - base) // per_unit + 8
    while count_tokens(tokenizer, prompt_of(hi)[0]) <= length:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # largest n whose prompt fits
        mid = (lo + hi) // 2
        if count_tokens(tokenizer, prompt_of(mid)[0]) <= length:
            lo = mid
        else:
            hi = mid
    prompt, positions = prompt_of(lo)
    return {"prompt": prompt, "expected": [v for _, v in needles], "keys": keys,
            "tokens": count_tokens(tokenizer, prompt), "needle_positions": positions}


def answer_score(answer: str, expected: Sequence[str]) -> float:
    """Fraction of expected values that occur in the answer, case-insensitive (RULER `string_match_all`)."""
    if not expected:
        raise ValueError("no expected values")
    lowered = answer.lower()
    return sum(value.lower() in lowered for value in expected) / len(expected)


def load_tokenizer(tokenizer: Tokenizer | str | Path) -> Tokenizer:
    """A tokenizer object, or one loaded with transformers from a local folder."""
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer))
    if not callable(tokenizer):
        raise TypeError("tokenizer must be a Hugging Face tokenizer or a path to one")
    return tokenizer


class NIAHSource(TaskSource):
    """Generated needle-in-a-haystack tasks, one per (length, depth, variant, value type, haystack, repeat).

    tokenizer: an HF tokenizer or its folder; lengths: target prompt lengths in tokens; depths: fractions in
    [0, 1]. `reference` is `{"values": [...]}`; `metadata` carries length, depth, variant, value type, haystack
    and the actual token count for breakdowns.
    """

    name = "niah"

    def __init__(self, tokenizer: Tokenizer | str | Path, lengths: Sequence[int] = (4096,),
                 depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), variants: Sequence[str] = ("single",),
                 value_types: Sequence[str] = ("number",), key_type: str = "word",
                 haystacks: Sequence[str] = ("noise",), repeats: int = 1, num_distractors: int = 3,
                 num_values: int = 4, num_queries: int = 4, seed: int = 0, limit: int | None = None,
                 domain: str = "retrieval", reward: str | None = None) -> None:
        tok = load_tokenizer(tokenizer)
        self.samples: list[Sample] = []
        for length in lengths:
            for depth in depths:
                for variant in variants:
                    for value_type in value_types:
                        for haystack in haystacks:
                            for r in range(repeats):
                                if limit is not None and len(self.samples) >= limit:
                                    return
                                sample_id = f"niah/{variant}/{value_type}/{haystack}/{length}/{depth:g}/{r}"
                                rng = random.Random(f"{seed}/{sample_id}")
                                built = build_sample(tok, length, depth, variant, value_type, key_type, haystack,
                                                     num_distractors, num_values, num_queries, rng)
                                self.samples.append(Sample(
                                    id=sample_id, domain=domain, reward=reward,
                                    messages=[{"role": "user", "content": built["prompt"]}],
                                    reference={"values": built["expected"]},
                                    metadata={"benchmark": "niah", "length": int(length), "depth": float(depth),
                                              "variant": variant, "value_type": value_type,
                                              "haystack": haystack, "tokens": built["tokens"]},
                                ))

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def __len__(self) -> int:
        return len(self.samples)


@register_task_source("niah")
def niah_source(**kwargs: Any) -> NIAHSource:
    """YAML: `{source: niah, tokenizer: PATH, lengths: [4096, 8192], depths: [0, 0.5, 1], variants: [...]}`."""
    return NIAHSource(**kwargs)


def evaluate(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean score (percent) overall and per length, depth, variant: records hold `answer`, `expected` and the
    breakdown keys (`length`, `depth`, `variant` when known)."""
    groups: dict[str, dict[Any, list[float]]] = {k: defaultdict(list) for k in ("length", "depth", "variant")}
    scores = []
    for rec in records:
        score = answer_score(rec["answer"], rec["expected"])
        scores.append(score)
        for key, table in groups.items():
            if rec.get(key) is not None:
                table[rec[key]].append(score)

    def summary(values: list[float]) -> dict[str, Any]:
        return {"score": round(100.0 * sum(values) / len(values), 2), "n": len(values)}
    metrics: dict[str, Any] = {"benchmark": "niah", **summary(scores)} if scores else {"benchmark": "niah", "n": 0}
    for key, table in groups.items():
        metrics[f"by_{key}"] = {str(k): summary(v) for k, v in sorted(table.items())}
    return metrics


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """Lines `{"answer": str, "expected": [str, ...], "length"?: int, "depth"?: float, "variant"?: str}`."""
    records = []
    for lineno, row in read_jsonl(path):
        where = f"{path}:{lineno}"
        if not isinstance(row.get("answer"), str):
            raise PredictionsError(f"{where}: needs a string 'answer'")
        expected = row.get("expected")
        if not isinstance(expected, list) or not expected or not all(isinstance(v, str) for v in expected):
            raise PredictionsError(f"{where}: needs 'expected', a non-empty list of strings")
        records.append(row)
    if not records:
        raise PredictionsError(f"{path}: no predictions")
    return records


def records_from_generations(samples: Sequence[Sample], completions: Sequence[str]) -> list[dict[str, Any]]:
    """Scoring records from samples and model text."""
    return [{"answer": text, "expected": s.reference["values"], "length": s.metadata.get("length"),
             "depth": s.metadata.get("depth"), "variant": s.metadata.get("variant")}
            for s, text in zip(samples, completions)]

