"""Format rewards (is the answer shaped right?) and the weighted combinator.

Format rewards score shape, not content, so they return 0.0 for a bad shape instead of raising InvalidAnswer:
a malformed answer is exactly what they measure.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rewards.registry import BatchReward, Outcome, get_reward, register_reward
from rewards.text import answer_region, tag_contents

_FENCED_JSON = re.compile(r"```(?:json)?\s*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_THINK_ANSWER = re.compile(r"^\s*<think>.*?</think>\s*<answer>(.*?)</answer>\s*$", re.DOTALL | re.IGNORECASE)


def has_tag(text: str, tag: str = "answer") -> bool:
    """True when `text` holds exactly one `<tag>...</tag>` with non-blank content."""
    contents = tag_contents(text, tag)
    return len(contents) == 1 and bool(contents[0].strip())


@register_reward("answer_tag", "1 if the completion holds exactly one non-empty <answer>...</answer> (meta 'format_tag')")
def answer_tag_reward(completion: str, reference: Any = None, format_tag: str = "answer", **meta: Any) -> float:
    """Another tag name via metadata `format_tag` (e.g. "box")."""
    return float(has_tag(completion, format_tag))


@register_reward("think_answer_format", "1 if the completion is exactly <think>...</think> then <answer>...</answer>")
def think_answer_format_reward(completion: str, reference: Any = None, **meta: Any) -> float:
    match = _THINK_ANSWER.match(completion)
    return float(bool(match and match.group(1).strip()))


@register_reward("regex_format", "1 if the completion fully matches the regex in meta 'format_regex' (DOTALL)")
def regex_format_reward(completion: str, reference: Any = None, format_regex: str | None = None, **meta: Any) -> float:
    if not format_regex:
        raise ValueError("regex_format needs the pattern in the sample metadata key 'format_regex'")
    return float(re.fullmatch(format_regex, completion.strip(), re.DOTALL) is not None)


def parse_json_answer(text: str) -> Any:
    """The JSON value in the answer region (or in a ```json fenced block); ValueError when none parses."""
    region = answer_region(text)
    candidates = [region] + _FENCED_JSON.findall(region)
    for candidate in candidates:
        try:
            return json.loads(candidate.strip())
        except ValueError:
            continue
    raise ValueError("no JSON value found")


@register_reward("json_format", "1 if the answer (or a ```json block in it) parses as JSON")
def json_format_reward(completion: str, reference: Any = None, **meta: Any) -> float:
    try:
        parse_json_answer(completion)
    except ValueError:
        return 0.0
    return 1.0


def tag_reward(tag: str) -> Callable[..., float]:
    """A native reward for a custom tag name, for Python callers (`combine([(tag_reward("box"), 0.1), ...])`)."""

    def reward(completion: str, reference: Any = None, **meta: Any) -> float:
        return float(has_tag(completion, tag))

    reward.__qualname__ = f"tag_reward({tag!r})"
    return reward


def regex_reward(pattern: str) -> Callable[..., float]:
    """A native reward: 1 if the stripped completion fully matches `pattern` (DOTALL)."""
    compiled = re.compile(pattern, re.DOTALL)

    def reward(completion: str, reference: Any = None, **meta: Any) -> float:
        return float(compiled.fullmatch(completion.strip()) is not None)

    reward.__qualname__ = f"regex_reward({pattern!r})"
    return reward


class CombinedReward(BatchReward):
    """Weighted sum of rewards: `sum_i w_i * r_i`.

    An invalid part contributes 0 and its reason is kept (the sample counts as invalid); an error in any part
    makes the sample an error. Batched (TRL-style) when any part is.
    """

    def __init__(self, parts: Sequence[tuple[BatchReward, float]]):
        if not parts:
            raise ValueError("combine() needs at least one (reward, weight) pair")
        self.parts = list(parts)
        self.batched = any(reward.batched for reward, _ in self.parts)
        self.name = " + ".join(f"{weight:g}*{reward.name}" for reward, weight in self.parts)

    def outcomes(self, prompts, completions, references, metas, extras=None) -> list[Outcome]:
        per_part = [(reward.outcomes(prompts, completions, references, metas, extras), w) for reward, w in self.parts]
        results = []
        for i in range(len(completions)):
            value, invalid, errors = 0.0, [], []
            for outcomes, weight in per_part:
                outcome = outcomes[i]
                if outcome.error:
                    errors.append(outcome.error)
                value += weight * outcome.value
                invalid.extend(outcome.invalid)
            if errors:
                results.append(Outcome(0.0, tuple(invalid), "; ".join(errors)))
            else:
                results.append(Outcome(value, tuple(invalid)))
        return results


def _parse_item(item: Any) -> tuple[Any, float]:
    if isinstance(item, dict):
        unknown = set(item) - {"reward", "weight"}
        if "reward" not in item or unknown:
            raise ValueError(f"weighted reward entry {item!r}: expected keys 'reward' and optional 'weight'")
        weight = item.get("weight", 1.0)
        spec = item["reward"]
    elif isinstance(item, (list, tuple)) and len(item) == 2:
        spec, weight = item
    else:
        raise ValueError(f"weighted reward entry {item!r}: expected {{'reward': spec, 'weight': w}} or (spec, w)")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise ValueError(f"weighted reward entry {item!r}: weight must be a number")
    return spec, float(weight)


def combine(items: Sequence[Any], base_dir: str | Path | None = None) -> CombinedReward:
    """A weighted sum of rewards from `[(fn_or_spec, w), ...]` or the YAML form `[{"reward": spec, "weight": w}]`
    (weight defaults to 1)."""
    parts = []
    for item in items:
        spec, weight = _parse_item(item)
        parts.append((get_reward(spec, base_dir=base_dir), weight))
    return CombinedReward(parts)
