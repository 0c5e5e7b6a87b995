"""The Berkeley Function Calling Leaderboard's AST checker, as a scorer and as a training reward.

Rules follow the leaderboard's `ast_checker` (Python categories) and its decoders:
- decoding: a Python-style call list (`[f(a=1), mod.g(b='x')]`, the prompting format; keyword arguments only,
  dotted names kept) or, for tool-calling models, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
  blocks (the Qwen/Hermes format); a `<think>...</think>` preamble is dropped first;
- per call: the function name, every required parameter present, no parameter outside the schema or the
  ground truth, the type of each value (int accepted for float; tuples as lists; one level of nested element
  types for arrays; a value of the ground truth's own type accepted as a "variable"), and the value among the
  accepted ones, with strings compared after the leaderboard's standardisation (drop spaces and `,./-_*^`,
  lower-case, single to double quotes); a ground-truth parameter may be omitted only if `""` is accepted;
- categories: `parallel*` match calls in any order (greedy, per expected call), `multiple` checks the one call
  against the expected function, others need exactly one call; `irrelevance` succeeds when no call is decoded.
Deviation: arithmetic in argument values (`x=2*3`) is folded only over literals, never `eval`-ed, so a reward
computed on model text cannot run code.

This module has no dependency on the rest of `rewards`; the `bfcl_ast` reward registers itself at the bottom
when the reward registry is importable.
"""

from __future__ import annotations

import ast
import json
import operator
import re
from dataclasses import dataclass
from typing import Any
from collections.abc import Sequence

TYPE_MAP: dict[str, type] = {
    "string": str, "integer": int, "float": float, "boolean": bool,
    "array": list, "tuple": list, "dict": dict, "any": str,
}
NESTED_TYPES = ("array", "tuple")
CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple", "live_simple", "irrelevance")


class DecodeError(ValueError):
    """Model text that does not decode to a list of function calls."""


@dataclass
class CheckResult:
    """Outcome of one sample: `valid`, and when not, the checker's error type and message."""

    valid: bool
    error_type: str = ""
    error: str = ""


# ----------------------------------------------------------------------------------------------- decoding
_THINK_END = "</think>"
_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_BINOPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}


def decode_calls(text: str) -> list[dict[str, dict[str, Any]]]:
    """Calls `[{name: {param: value}}]` decoded from model text, or DecodeError."""
    if _THINK_END in text:
        text = text.rsplit(_THINK_END, 1)[1]
    if "<tool_call>" in text:
        return decode_tool_call_tags(text)
    return decode_python_calls(text)


def decode_tool_call_tags(text: str) -> list[dict[str, dict[str, Any]]]:
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks; blocks that are not JSON are skipped."""
    calls = []
    for body in _TOOL_CALL.findall(text):
        try:
            obj = json.loads(body.strip())
        except json.JSONDecodeError:
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            raise DecodeError(f"tool call without a name: {body.strip()[:80]!r}")
        arguments = obj.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                raise DecodeError(f"tool call arguments are not JSON: {arguments[:80]!r}") from None
        if not isinstance(arguments, dict):
            raise DecodeError(f"tool call arguments must be an object, got {type(arguments).__name__}")
        calls.append({obj["name"]: arguments})
    return calls


def decode_python_calls(text: str) -> list[dict[str, dict[str, Any]]]:
    """The leaderboard's prompting decoder: strip backticks/newlines/spaces, wrap in `[...]`, parse as Python."""
    text = text.strip("`\n ")
    if not text.startswith("["):
        text = "[" + text
    if not text.endswith("]"):
        text = text + "]"
    try:
        tree = ast.parse(text.strip().strip("'"), mode="eval")
    except SyntaxError as exc:
        raise DecodeError(f"not a Python call list: {exc.msg}") from None
    try:
        return _calls_of(tree.body)
    except (TypeError, ValueError, AttributeError) as exc:  # e.g. -'a', unhashable dict keys
        if isinstance(exc, DecodeError):
            raise
        raise DecodeError(f"cannot read argument values: {exc}") from None


def _calls_of(body: ast.AST) -> list[dict[str, dict[str, Any]]]:
    if isinstance(body, ast.Call):
        return [_resolve_call(body)]
    if not isinstance(body, (ast.List, ast.Tuple, ast.Set)):
        raise DecodeError(f"expected a list of calls, got {type(body).__name__}")
    calls = []
    for element in body.elts:
        if not isinstance(element, ast.Call):
            raise DecodeError(f"list element is not a call: {ast.unparse(element)[:80]!r}")
        calls.append(_resolve_call(element))
    return calls


def _resolve_call(node: ast.Call) -> dict[str, dict[str, Any]]:
    parts = []
    func = node.func
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    name = ".".join(reversed(parts))
    return {name: {kw.arg: _resolve_value(kw.value) for kw in node.keywords}}


def _resolve_value(node: ast.AST) -> Any:
    """An argument's value as the leaderboard reads it (names and calls without keywords become strings)."""
    if isinstance(node, ast.Constant):
        return "..." if node.value is Ellipsis else node.value
    if isinstance(node, ast.UnaryOp):
        if not isinstance(node.operand, ast.Constant):
            raise DecodeError(f"unsupported unary operand: {ast.unparse(node)[:80]!r}")
        return -node.operand.value  # the leaderboard negates whatever the operator is
    if isinstance(node, ast.List):
        return [_resolve_value(v) for v in node.elts]
    if isinstance(node, ast.Dict):
        return {_resolve_value(k): _resolve_value(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.BinOp):
        return _fold(node)
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Call):
        return _resolve_call(node) if node.keywords else ast.unparse(node)
    if isinstance(node, ast.Tuple):
        return tuple(_resolve_value(v) for v in node.elts)
    if isinstance(node, ast.Subscript):
        return ast.unparse(node.value) + "[" + ast.unparse(node.slice) + "]"
    raise DecodeError(f"unsupported value: {type(node).__name__}")


def _fold(node: ast.AST) -> Any:
    """Evaluate arithmetic over literals only (numbers, strings, lists)."""
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        if isinstance(node.op, ast.Pow) and not (isinstance(node.right, ast.Constant) and abs(node.right.value) <= 64):
            raise DecodeError(f"exponent too large or not a literal: {ast.unparse(node)[:80]!r}")
        left, right = _fold(node.left), _fold(node.right)
        if isinstance(node.op, ast.Mult) and _too_long(left, right):
            raise DecodeError(f"repetition too large: {ast.unparse(node)[:80]!r}")
        try:
            return _BINOPS[type(node.op)](left, right)
        except (TypeError, ZeroDivisionError, OverflowError, ValueError) as exc:
            raise DecodeError(f"cannot evaluate {ast.unparse(node)[:80]!r}: {exc}") from None
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _fold(node.operand)
        return -value if isinstance(node.op, ast.USub) else +value
    if isinstance(node, (ast.Constant, ast.List, ast.Tuple, ast.Dict)):
        return _resolve_value(node)
    raise DecodeError(f"unsupported expression: {ast.unparse(node)[:80]!r}")


def _too_long(left: Any, right: Any, limit: int = 100_000) -> bool:
    """Whether `left * right` repeats a sequence past `limit` items (guards a reward worker's memory)."""
    for seq, count in ((left, right), (right, left)):
        if isinstance(seq, (str, list, tuple)) and isinstance(count, int) and len(seq) * count > limit:
            return True
    return False


def has_calls(decoded: Any) -> bool:
    """Whether decoded output holds a function call (the leaderboard's `not is_empty_output`)."""
    if not isinstance(decoded, list) or not decoded:
        return False
    if not all(isinstance(c, dict) and len(c) == 1 and isinstance(next(iter(c.values())), dict) for c in decoded):
        return False
    return not (len(decoded) == 1 and len(decoded[0]) == 0)


# ----------------------------------------------------------------------------------------------- checking
def standardize_string(text: str) -> str:
    """Drop spaces and `,./-_*^`, lower-case, single quotes to double (the leaderboard's string standardisation)."""
    return re.sub(r"[ ,./\-_*^]", "", text).lower().replace("'", '"')


def _answer_type(accepted: Sequence[Any]) -> type | None:
    for value in accepted:
        if value != "":
            return type(value)
    return None


def _type_check(param: str, value: Any, accepted: Sequence[Any], expected: type,
                nested: type | None) -> tuple[bool, bool, str]:
    """`(valid, is_variable, error)` for one value against the schema type and the accepted values' type."""
    answer_type = _answer_type(accepted)
    is_variable = answer_type is not None and answer_type is not expected
    if type(value) is expected:
        if nested is None:
            return True, is_variable, ""
        for item in accepted:
            if not isinstance(item, list) or all(
                _type_check(param, element, item, nested, None)[0] for element in value
            ):
                return True, is_variable, ""
        return False, False, f"nested type check failed for {param!r}: {value!r}"
    if answer_type is not None and type(value) is answer_type:
        return True, True, ""
    return False, False, f"incorrect type for {param!r}: expected {expected.__name__}, got {type(value).__name__}"


def _standard(value: Any) -> Any:
    return standardize_string(value) if isinstance(value, str) else value


def _dict_check(value: dict, accepted: Sequence[Any]) -> bool:
    for option in accepted:
        if option == "":
            continue
        ok = all(key in option and _standard(v) in [_standard(a) for a in option[key]] for key, v in value.items())
        ok = ok and all(key in value or "" in options for key, options in option.items())
        if ok:
            return True
    return False


def _list_dict_check(value: list, accepted: Sequence[Any]) -> bool:
    for option in accepted:
        # a "" option has length 0, so it accepts an empty list, as in the leaderboard
        if isinstance(option, (list, str)) and len(option) == len(value) and all(
            isinstance(v, dict) and _dict_check(v, [o]) for v, o in zip(value, option)
        ):
            return True
    return False


def _value_check(value: Any, accepted: Sequence[Any], expected: type, nested: type | None) -> bool:
    if expected is dict:
        return _dict_check(value, accepted)
    if expected is list and nested is dict:
        return _list_dict_check(value, accepted)
    if expected is str:
        return standardize_string(value) in [standardize_string(a) for a in accepted if isinstance(a, str)]
    if expected is list:
        # a "" option standardises to [] (the leaderboard iterates it), so it accepts an empty list
        options = [[_standard(a) for a in option] for option in accepted if isinstance(option, (list, tuple, str))]
        return [_standard(v) for v in value] in options
    return value in accepted


def check_call(function: dict[str, Any], call: dict[str, dict[str, Any]], expected: dict[str, dict]) -> CheckResult:
    """One decoded call `{name: params}` against one expected call `{name: {param: [accepted ...]}}`."""
    accepted_params = next(iter(expected.values()))
    name = function["name"]
    if name not in call:
        return CheckResult(False, "wrong_func_name", f"function {name!r} not called")
    params = call[name]
    schema = function.get("parameters", {})
    properties = schema.get("properties", {})
    for param in schema.get("required", []):
        if param not in params:
            return CheckResult(False, "missing_required", f"missing required parameter {param!r}")
    for param, value in params.items():
        if param not in properties or param not in accepted_params:
            return CheckResult(False, "unexpected_param", f"unexpected parameter {param!r}")
        type_name = properties[param].get("type", "any")
        if type_name not in TYPE_MAP:
            return CheckResult(False, "unknown_type", f"schema type {type_name!r} of {param!r} is not a BFCL type")
        expected_type = TYPE_MAP[type_name]
        nested = None
        if type_name in NESTED_TYPES:
            nested = TYPE_MAP.get(properties[param].get("items", {}).get("type", "any"), str)
        if type_name == "tuple" and type(value) is tuple:
            value = list(value)
        if type_name == "float" and type(value) is int:
            value = float(value)
        ok, is_variable, error = _type_check(param, value, accepted_params[param], expected_type, nested)
        if not ok:
            return CheckResult(False, "type_error", error)
        if not is_variable and expected_type in (dict, list, str):
            if not _value_check(value, accepted_params[param], expected_type, nested):
                return CheckResult(False, "value_error", f"invalid value for {param!r}: {value!r}")
        elif value not in accepted_params[param]:
            return CheckResult(False, "value_error", f"invalid value for {param!r}: {value!r}")
    for param, accepted in accepted_params.items():
        if param not in params and "" not in accepted:
            return CheckResult(False, "missing_optional", f"parameter {param!r} not provided and not optional")
    return CheckResult(True)


def _function_named(functions: Sequence[dict[str, Any]], name: str) -> dict[str, Any]:
    for function in functions:
        if function["name"] == name:
            return function
    raise KeyError(f"expected function {name!r} is not among the offered functions")


def check_calls(functions: Sequence[dict[str, Any]], calls: list[dict], ground_truth: list[dict],
                category: str) -> CheckResult:
    """Decoded calls against the ground truth, with the category's matching rule."""
    if len(calls) != len(ground_truth):
        return CheckResult(False, "wrong_count", f"{len(calls)} calls for {len(ground_truth)} expected")
    if "parallel" in category:
        used: set[int] = set()
        for k, expected in enumerate(ground_truth):
            function = _function_named(functions, next(iter(expected)))
            match = next((i for i in range(len(calls)) if i not in used
                          and check_call(function, calls[i], expected).valid), None)
            if match is None:
                return CheckResult(False, "no_match", f"no call matches expected call {k}")
            used.add(match)
        return CheckResult(True)
    function = _function_named(functions, next(iter(ground_truth[0])))
    return check_call(function, calls[0], ground_truth[0])


def check_output(text: str, functions: Sequence[dict[str, Any]], ground_truth: list[dict] | None,
                 category: str) -> CheckResult:
    """Raw model output of one sample, scored as the leaderboard scores its category."""
    try:
        calls = decode_calls(text)
    except (DecodeError, RecursionError) as exc:
        if "irrelevance" in category:
            return CheckResult(True)
        return CheckResult(False, "decode_failed", str(exc))
    if "irrelevance" in category:
        return CheckResult(False, "called", "decoded a call where none was wanted") if has_calls(calls) \
            else CheckResult(True)
    if ground_truth is None:
        raise ValueError(f"category {category!r} needs a ground truth")
    return check_calls(functions, calls, ground_truth, category)


def category_of(sample_id: str) -> str:
    """The category in a BFCL id (`simple_python_12`, `live_simple_3-2-0`, `parallel_multiple_7` ...)."""
    for category in sorted(CATEGORIES, key=len, reverse=True):
        if sample_id.startswith(category + "_"):
            return category
    raise ValueError(f"id {sample_id!r} does not start with a known BFCL category ({', '.join(CATEGORIES)})")


def bfcl_ast(completion: str, reference: dict[str, Any], **meta: Any) -> float:
    """1.0 when the leaderboard's AST checker accepts the completion, else 0.0.

    reference: `{"category": str, "functions": [schema ...], "ground_truth": [{name: {param: [accepted]}}] | None}`.
    """
    result = check_output(completion, reference["functions"], reference.get("ground_truth"), reference["category"])
    return 1.0 if result.valid else 0.0


try:  # registered once the shared reward registry exists (rewards/registry.py)
    from rewards.registry import register_reward
except ImportError:  # pragma: no cover - registry written separately
    register_reward = None

if register_reward is not None:
    bfcl_ast = register_reward("bfcl_ast", "BFCL AST checker: 1 if the tool calls match the accepted answers")(bfcl_ast)
