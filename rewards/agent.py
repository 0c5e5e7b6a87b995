"""Agent tool calls: parse them from a completion, run them, and reward the outcome.

Call format (Qwen/Hermes): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one or several. With
`bare_json=True` (the default) a completion without tags may instead be one JSON call object, or a JSON list of
them (alone or in a ```json block). `arguments` may also be a JSON-encoded string (OpenAI style).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from rewards.errors import InvalidAnswer
from rewards.registry import register_reward
from rewards.text import normalize_text
from rewards.tools import ToolError, call_tool

_TOOL_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
_FENCE = re.compile(r"^```(?:json)?\s*\n?(.*?)\n?```$", re.DOTALL)
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


def _to_call(obj: Any) -> ToolCall:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        raise InvalidAnswer("tool call has no 'name'")
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            raise InvalidAnswer("tool call arguments are not valid JSON") from None
    if not isinstance(arguments, dict):
        raise InvalidAnswer("tool call arguments are not an object")
    return ToolCall(obj["name"], arguments)


def parse_tool_calls(text: str, bare_json: bool = True) -> list[ToolCall]:
    """The tool calls in `text`, in order. InvalidAnswer("no tool call") when there is none,
    InvalidAnswer("tool call is not valid JSON") when a call's body does not parse."""
    text = _THINK.sub("", text)
    bodies = _TOOL_CALL.findall(text)
    if bodies:
        calls = []
        for body in bodies:
            try:
                obj = json.loads(body.strip())
            except ValueError:
                raise InvalidAnswer("tool call is not valid JSON") from None
            calls.append(_to_call(obj))
        return calls
    if bare_json:
        stripped = text.strip()
        fenced = _FENCE.match(stripped)
        if fenced:
            stripped = fenced.group(1).strip()
        if stripped.startswith(("{", "[")):
            try:
                obj = json.loads(stripped)
            except ValueError:
                raise InvalidAnswer("tool call is not valid JSON") from None
            objs = obj if isinstance(obj, list) else [obj]
            if objs:
                return [_to_call(o) for o in objs]
    raise InvalidAnswer("no tool call")


def outcomes_match(value: Any, expected: Any, atol: float = 1e-6, rtol: float = 1e-6) -> bool:
    """Numbers within `atol + rtol*|expected|` (numeric strings count as numbers); other values equal after
    `normalize_text`; lists and dicts element-wise."""
    if isinstance(expected, (list, tuple)) and isinstance(value, (list, tuple)):
        return len(value) == len(expected) and all(outcomes_match(v, e, atol, rtol) for v, e in zip(value, expected))
    if isinstance(expected, dict) and isinstance(value, dict):
        return value.keys() == expected.keys() and all(outcomes_match(value[k], expected[k], atol, rtol) for k in expected)
    a, b = _as_number(value), _as_number(expected)
    if a is not None and b is not None:
        return math.isfinite(a) and abs(a - b) <= atol + rtol * abs(b)
    return normalize_text(str(value)) == normalize_text(str(expected))


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip().replace(",", ""))
        except ValueError:
            return None
    return None


def run_tool_calls(calls: list[ToolCall], env: dict[str, Any] | None = None, allowed: list[str] | None = None) -> list[Any]:
    """Execute the calls in order; InvalidAnswer with the tool's complaint on a disallowed/unknown tool or bad
    arguments."""
    results = []
    for call in calls:
        if allowed is not None and call.name not in allowed:
            raise InvalidAnswer(f"tool {call.name!r} is not offered")
        try:
            results.append(call_tool(call.name, call.arguments, env))
        except ToolError as exc:
            raise InvalidAnswer(str(exc)) from None
    return results


@register_reward("tool_outcome", "run the completion's tool call(s); 1 if the outcome equals reference['answer']")
def tool_outcome_reward(
    completion: str,
    reference: Any,
    tool_env: dict[str, Any] | None = None,
    allowed_tools: list[str] | None = None,
    bare_json: bool = True,
    atol: float = 1e-6,
    rtol: float = 1e-6,
    **meta: Any,
) -> float:
    """Reference `{"answer": x}`: 1.0 when the LAST call's result matches x. Reference `{"answers": [x1, ...]}`:
    the fraction of positions whose result matches, divided by max(#calls, #answers) (surplus calls cost).
    A non-dict reference is treated as `{"answer": reference}`. Metadata: `tool_env` (lookup tables),
    `allowed_tools` (names the model was offered), `bare_json`, `atol`/`rtol`."""
    calls = parse_tool_calls(completion, bare_json=bare_json)
    results = run_tool_calls(calls, tool_env, allowed_tools)
    if not isinstance(reference, dict):
        reference = {"answer": reference}
    if "answers" in reference:
        expected = list(reference["answers"])
        hits = sum(outcomes_match(r, e, atol, rtol) for r, e in zip(results, expected))
        return hits / max(len(results), len(expected), 1)
    if "answer" not in reference:
        raise ValueError(f"tool_outcome reference {reference!r:.80} has neither 'answer' nor 'answers'")
    return float(outcomes_match(results[-1], reference["answer"], atol, rtol))
