"""Checkable short answers: numbers (with tolerance), yes/no, multiple-choice letters.

Where the answer is read, in priority order: the last `\\boxed{...}`; else the text after the last
"Answer:" / "final answer is" on its line; else the whole answer region (last `<answer>` block, or the text
without `<think>`). Inside an explicit answer (boxed / "Answer:") the FIRST number counts ("Answer: 42 (about
40)" -> 42); in the fallback free text the LAST number counts (the conclusion comes last).
"""

from __future__ import annotations

import math
import re
from typing import Any

from rewards.errors import InvalidAnswer
from rewards.registry import register_reward
from rewards.text import answer_region

_ANSWER_CUE = re.compile(r"(?:final\s+answer|answer)\s*(?:is|:|=)\s*:?", re.IGNORECASE)
_NUMBER = re.compile(
    r"\\frac\{\s*(?P<fn>-?\d+(?:\.\d+)?)\s*\}\{\s*(?P<fd>-?\d+(?:\.\d+)?)\s*\}"
    r"|(?<![\w.])(?P<num>-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|-?\.\d+)"
    r"(?:\s*/\s*(?P<den>\d+(?:\.\d+)?))?"
)
_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (nested braces allowed), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def final_answer(text: str) -> tuple[str, bool]:
    """(the answer text, whether it came from an explicit marker: boxed or "Answer:")."""
    region = answer_region(text)
    boxed = extract_boxed(region)
    if boxed is not None:
        return boxed.strip(), True
    cues = list(_ANSWER_CUE.finditer(region))
    if cues:
        rest = region[cues[-1].end() :].strip()
        return rest.splitlines()[0].strip() if rest else "", True
    return region, False


def _value(match: re.Match) -> float | None:
    if match.group("fn") is not None:
        num, den = float(match.group("fn")), float(match.group("fd"))
    else:
        num = float(match.group("num").replace(",", ""))
        den = float(match.group("den")) if match.group("den") else 1.0
    return None if den == 0 else num / den


def extract_number(text: str) -> float | None:
    """The answer's number (see module doc for which one), or None. Handles `1,234`, `-3.5`, `1e-3`, `3/4`,
    `\\frac{3}{4}`."""
    answer, explicit = final_answer(text)
    values = [v for v in (_value(m) for m in _NUMBER.finditer(answer)) if v is not None]
    if not values:
        return None
    return values[0] if explicit else values[-1]


def _reference_number(reference: Any) -> float:
    if isinstance(reference, dict):
        reference = reference.get("answer")
    if isinstance(reference, bool):
        raise ValueError(f"numeric reference {reference!r} is a bool")
    if isinstance(reference, (int, float)):
        return float(reference)
    if isinstance(reference, str):
        matches = [v for v in (_value(m) for m in _NUMBER.finditer(reference)) if v is not None]
        if len(matches) == 1:
            return matches[0]
    raise ValueError(f"numeric reference {reference!r:.80} is not a single number")


def numbers_match(pred: float, truth: float, atol: float = 1e-6, rtol: float = 1e-6) -> bool:
    """`|pred - truth| <= atol + rtol * |truth|`."""
    return math.isfinite(pred) and abs(pred - truth) <= atol + rtol * abs(truth)


@register_reward("numeric_match", "1 if the extracted number equals the reference within tolerance (meta atol/rtol)")
def numeric_match_reward(
    completion: str, reference: Any, atol: float | None = None, rtol: float | None = None, **meta: Any
) -> float:
    """Tolerances come from metadata `atol`/`rtol`, else from a reference dict's `tolerance` (absolute), else 1e-6."""
    predicted = extract_number(completion)
    if predicted is None:
        raise InvalidAnswer("no number found")
    if atol is None:
        atol = reference.get("tolerance", 1e-6) if isinstance(reference, dict) else 1e-6
    return float(numbers_match(predicted, _reference_number(reference), float(atol), float(1e-6 if rtol is None else rtol)))


def extract_yes_no(text: str) -> str | None:
    """"yes" or "no" from the answer: the only one of the two words present, or the first word when both appear;
    None when neither appears or both appear and the answer does not start with one."""
    answer, _ = final_answer(text)
    words = [w.lower() for w in _YES_NO.findall(answer)]
    if not words:
        return None
    if len(set(words)) == 1:
        return words[0]
    first = _YES_NO.match(answer.lstrip(" \t\n*(\"'"))
    return first.group(1).lower() if first else None


def _reference_yes_no(reference: Any) -> str:
    if isinstance(reference, dict):
        reference = reference.get("answer")
    if isinstance(reference, bool):
        return "yes" if reference else "no"
    value = str(reference).strip().lower().rstrip(".")
    if value in ("yes", "no"):
        return value
    raise ValueError(f"yes/no reference {reference!r:.80} is neither yes nor no")


@register_reward("yes_no", "1 if the yes/no answer equals the reference (yes/no or true/false)")
def yes_no_reward(completion: str, reference: Any, **meta: Any) -> float:
    answer = extract_yes_no(completion)
    if answer is None:
        raise InvalidAnswer("no unambiguous yes/no")
    return float(answer == _reference_yes_no(reference))


_CHOICE_ALONE = re.compile(r"^\s*[\*\"'(\[]*([A-J])\s*(?:[\]).:\*\"']|$)")
_CHOICE_CUE = re.compile(r"\b(?:option|choice)\s*(?:is\s*)?:?\s*\(?([A-J])\b")
_CHOICE_PAREN = re.compile(r"\(([A-J])\)")


def extract_choice(text: str) -> str | None:
    """The option letter A-J: the answer starting with a letter ("B", "(B)", "B. text"; not "A cat"), else "option B", else
    a single distinct "(B)" in the answer; None otherwise."""
    answer, _ = final_answer(text)
    for pattern in (_CHOICE_ALONE, _CHOICE_CUE):
        match = pattern.search(answer)
        if match:
            return match.group(1)
    letters = set(_CHOICE_PAREN.findall(answer))
    return letters.pop() if len(letters) == 1 else None


@register_reward("multiple_choice", "1 if the chosen option letter (A-J) equals the reference letter")
def multiple_choice_reward(completion: str, reference: Any, **meta: Any) -> float:
    choice = extract_choice(completion)
    if choice is None:
        raise InvalidAnswer("no option letter found")
    if isinstance(reference, dict):
        reference = reference.get("answer")
    truth = str(reference).strip().strip("().").upper()
    if len(truth) != 1 or not "A" <= truth <= "J":
        raise ValueError(f"multiple-choice reference {reference!r:.80} is not a letter A-J")
    return float(choice == truth)
