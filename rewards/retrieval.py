"""Retrieval answers (needle-in-a-haystack, long-context QA): string comparisons against the reference.

The reference is a string or a list of acceptable strings (aliases; the best match counts), except for
`multi_needle`, where the list is the set of values that must ALL be found. Comparisons read the answer region
(last `<answer>` block, or the text without `<think>`).
"""

from __future__ import annotations

from typing import Any

from rewards.errors import InvalidAnswer
from rewards.registry import register_reward
from rewards.text import answer_region, normalize_text, token_f1


def _answer(completion: str) -> str:
    answer = answer_region(completion)
    if not answer.strip():
        raise InvalidAnswer("empty answer")
    return answer


def _aliases(reference: Any) -> list[str]:
    if isinstance(reference, dict):
        reference = reference.get("answers", reference.get("answer"))
    if isinstance(reference, (list, tuple)):
        aliases = [str(r) for r in reference]
    elif reference is None:
        aliases = []
    else:
        aliases = [str(reference)]
    if not aliases:
        raise ValueError("retrieval reference is empty")
    return aliases


def exact_match(prediction: str, reference: Any) -> float:
    """1.0 when the stripped prediction equals one alias exactly (case and punctuation matter)."""
    return float(any(prediction.strip() == alias.strip() for alias in _aliases(reference)))


def normalized_match(prediction: str, reference: Any) -> float:
    """1.0 when the prediction equals an alias after lower-casing and removing punctuation and extra spaces."""
    pred = normalize_text(prediction)
    return float(any(pred == normalize_text(alias) for alias in _aliases(reference)))


def best_token_f1(prediction: str, reference: Any) -> float:
    """The best token F1 of the prediction against any alias."""
    return max(token_f1(prediction, alias) for alias in _aliases(reference))


def needle_recall(prediction: str, needles: Any) -> float:
    """Fraction of expected values found in the prediction (normalised, whole-word containment)."""
    values = _aliases(needles)
    haystack = f" {normalize_text(prediction)} "
    found = sum(f" {normalize_text(value)} " in haystack for value in values if normalize_text(value))
    return found / len(values)


@register_reward("exact_match", "1 if the answer equals the reference (or one alias) exactly after stripping")
def exact_match_reward(completion: str, reference: Any, **meta: Any) -> float:
    return exact_match(_answer(completion), reference)


@register_reward("normalized_match", "1 if the answer equals the reference ignoring case, punctuation, whitespace")
def normalized_match_reward(completion: str, reference: Any, **meta: Any) -> float:
    return normalized_match(_answer(completion), reference)


@register_reward("token_f1", "best token-level F1 of the answer against the reference strings")
def token_f1_reward(completion: str, reference: Any, **meta: Any) -> float:
    return best_token_f1(_answer(completion), reference)


@register_reward("multi_needle", "fraction of the expected needle values found in the answer")
def multi_needle_reward(completion: str, reference: Any, **meta: Any) -> float:
    return needle_recall(_answer(completion), reference)


def record_value(prediction: str, key: str | None) -> str:
    """The value of a `key: value` (or `key=value`) answer, or the whole answer when it restates no key.

    A restated key that is not the asked one is a wrong record, which InvalidAnswer would hide: it returns "".
    """
    text = prediction.strip()
    separator = next((sep for sep in (":", "=") if sep in text), None)
    if separator is None:
        return text
    said_key, _, value = text.partition(separator)
    if key is not None and normalize_text(said_key) != normalize_text(key):
        return ""
    return value.strip()


@register_reward("record_value", "1 if the value of a 'key: value' / 'key=value' (or bare) answer equals reference['value']")
def record_value_reward(completion: str, reference: Any, **meta: Any) -> float:
    if not isinstance(reference, dict) or "value" not in reference:
        raise ValueError("record_value needs a reference {'key': ..., 'value': ...}")
    value = record_value(_answer(completion), reference.get("key"))
    return float(normalize_text(value) == normalize_text(str(reference["value"])) and value != "")
