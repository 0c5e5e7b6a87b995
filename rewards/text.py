"""Text helpers shared by the built-in rewards: where the answer is, and how two answers are compared."""

from __future__ import annotations

import re
import string
from collections import Counter

_THINK = re.compile(r"<think>.*?(?:</think>|$)", re.DOTALL | re.IGNORECASE)
_PUNCT = re.compile("[" + re.escape(string.punctuation) + "\u2018\u2019\u201c\u201d\u2013\u2014\u2026" + "]")


def tag_contents(text: str, tag: str) -> list[str]:
    """Contents of every `<tag>...</tag>` in `text`, in order (non-greedy, case-insensitive tag name)."""
    pattern = re.compile(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", re.DOTALL | re.IGNORECASE)
    return pattern.findall(text)


def answer_region(text: str) -> str:
    """The part of a completion that holds the answer.

    Reasoning models wrap the final answer in `<answer>...</answer>` after a `<think>` block; numbers and
    intervals inside the thinking must not be graded. So: the last `<answer>` block when there is one, else the
    text with `<think>...</think>` blocks (or an unclosed trailing `<think>`) removed.
    """
    answers = tag_contents(text, "answer")
    if answers:
        return answers[-1].strip()
    return _THINK.sub(" ", text).strip()


def normalize_text(text: str) -> str:
    """Lower case, punctuation replaced by spaces, whitespace collapsed. Articles are kept (unlike SQuAD's
    normaliser) because for needle values ("The Hague") they are part of the answer."""
    text = _PUNCT.sub(" ", str(text).lower())
    return " ".join(text.split())


def tokens(text: str) -> list[str]:
    """Normalised word tokens."""
    return normalize_text(text).split()


def token_f1(prediction: str, reference: str) -> float:
    """Bag-of-tokens F1 between two strings after normalisation (1.0 when both are empty, 0.0 when only one is)."""
    pred, ref = tokens(prediction), tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def truncate(text: str, limit: int = 120) -> str:
    """`text` cut to `limit` characters with an ellipsis, for error messages."""
    text = str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
