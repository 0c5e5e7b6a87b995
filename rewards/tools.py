"""Tools an agent may call during a reward check, with their JSON schemas, and two built-ins.

A tool is `fn(arguments: dict, env: dict) -> value`; `env` is the sample's `metadata["tool_env"]` (per-sample
state such as lookup tables), so one registered tool serves every sample. Arguments are checked against the
tool's `parameters_schema` (a JSON-Schema subset: object properties, required, types, enum) before the call.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class ToolError(ValueError):
    """A tool call that cannot be carried out (bad arguments, unknown key, division by zero ...)."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[[dict[str, Any], dict[str, Any]], Any]

    def schema(self) -> dict[str, Any]:
        """The OpenAI/Qwen function schema, ready for `Sample.tools` and the chat template."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


_TOOLS: dict[str, Tool] = {}


def register_tool(name: str, description: str, parameters_schema: dict[str, Any]) -> Callable[[Callable], Callable]:
    """Decorator: register `fn(arguments, env)` as tool `name`."""
    if parameters_schema.get("type") != "object":
        raise ValueError(f"tool {name!r}: parameters_schema must have type 'object'")

    def wrap(fn: Callable) -> Callable:
        if name in _TOOLS:
            raise ValueError(f"tool {name!r} is registered twice")
        _TOOLS[name] = Tool(name, description, parameters_schema, fn)
        return fn

    return wrap


def get_tool(name: str) -> Tool:
    if name not in _TOOLS:
        raise ToolError(f"unknown tool {name!r}; known: {', '.join(sorted(_TOOLS))}")
    return _TOOLS[name]


def list_tools() -> list[tuple[str, str]]:
    """(name, description) of every registered tool, sorted."""
    return [(t.name, t.description) for t in sorted(_TOOLS.values(), key=lambda t: t.name)]


def tool_schemas(names: list[str] | None = None) -> list[dict[str, Any]]:
    """Function schemas of the named tools (all when None), in the given order."""
    return [get_tool(n).schema() for n in (names if names is not None else sorted(_TOOLS))]


_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
}


def validate_arguments(tool: Tool, arguments: Any) -> None:
    """ToolError naming the tool and argument when `arguments` does not fit the tool's schema. Unknown argument
    names are rejected unless the schema sets `additionalProperties: true`."""
    if not isinstance(arguments, dict):
        raise ToolError(f"tool {tool.name!r}: arguments must be an object, got {type(arguments).__name__}")
    properties = tool.parameters.get("properties", {})
    missing = [k for k in tool.parameters.get("required", []) if k not in arguments]
    if missing:
        raise ToolError(f"tool {tool.name!r}: missing argument(s) {missing}")
    for key, value in arguments.items():
        if key not in properties:
            if tool.parameters.get("additionalProperties") is True:
                continue
            raise ToolError(f"tool {tool.name!r}: unknown argument {key!r}")
        spec = properties[key]
        kinds = spec.get("type")
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if kinds and not any(_TYPES.get(kind, lambda v: True)(value) for kind in kinds):
            raise ToolError(f"tool {tool.name!r}: argument {key!r} should be {'/'.join(kinds)}, got {value!r:.40}")
        if "enum" in spec and value not in spec["enum"]:
            raise ToolError(f"tool {tool.name!r}: argument {key!r} must be one of {spec['enum']}")


def call_tool(name: str, arguments: Any, env: dict[str, Any] | None = None) -> Any:
    """Validate and run one call; ToolError on an unknown tool, bad arguments or a failing call."""
    tool = get_tool(name)
    validate_arguments(tool, arguments)
    try:
        return tool.fn(arguments, env or {})
    except ToolError:
        raise
    except (ArithmeticError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise ToolError(f"tool {name!r} failed: {type(exc).__name__}: {exc}") from exc


# --- calculator -------------------------------------------------------------------------------------------------

MAX_EXPRESSION_CHARS = 500
MAX_INT_BITS = 4096

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _check_size(value: float) -> int | float:
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise ToolError(f"calculator: intermediate result exceeds {MAX_INT_BITS} bits")
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolError("calculator: result is not finite")
    return value


def _power(base: float, exponent: float) -> int | float:
    """`base ** exponent`, refusing results whose size would blow past the limits before computing them."""
    is_int = isinstance(base, int) and isinstance(exponent, int)
    # exponent > MAX_INT_BITS alone settles it (and keeps the product below from overflowing a float)
    if is_int and abs(base) > 1 and (exponent > MAX_INT_BITS or exponent * math.log2(abs(base)) > MAX_INT_BITS):
        raise ToolError(f"calculator: power result would exceed {MAX_INT_BITS} bits")
    if base == 0 and exponent < 0:
        raise ToolError("calculator: zero to a negative power")
    try:
        result = base**exponent
    except OverflowError as exc:
        raise ToolError("calculator: power overflows") from exc
    if isinstance(result, complex):
        raise ToolError("calculator: power of a negative number gives a complex result")
    return result


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _check_size(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            return _check_size(_power(left, right))
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
            raise ToolError("calculator: division by zero")
        return _check_size(_BINARY[type(node.op)](left, right))
    raise ToolError(f"calculator: unsupported syntax {type(node).__name__}")


def safe_eval(expression: str) -> int | float:
    """Arithmetic on int/float literals with + - * / // % ** and parentheses, by walking the AST (no eval).
    Powers and intermediate integers are capped at MAX_INT_BITS bits so `9**9**9` is refused, not computed."""
    if not isinstance(expression, str) or not expression.strip():
        raise ToolError("calculator: empty expression")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"calculator: expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip().replace("^", "**"), mode="eval")
    except (SyntaxError, ValueError) as exc:
        raise ToolError(f"calculator: cannot parse {expression!r:.60}") from exc
    return _evaluate(tree)


@register_tool(
    "calculator",
    "Evaluate an arithmetic expression with + - * / // % ** and parentheses.",
    {
        "type": "object",
        "properties": {"expression": {"type": "string", "description": "e.g. (3 + 4) * 2 / 7"}},
        "required": ["expression"],
    },
)
def calculator_tool(arguments: dict[str, Any], env: dict[str, Any]) -> int | float:
    return safe_eval(arguments["expression"])


# --- lookup -----------------------------------------------------------------------------------------------------


def _norm_key(key: Any) -> str:
    return " ".join(str(key).casefold().split())


@register_tool(
    "lookup",
    "Look a key up in a named table, e.g. table='capital', key='France'.",
    {
        "type": "object",
        "properties": {
            "table": {"type": "string", "description": "table name"},
            "key": {"type": "string", "description": "entry to look up (case-insensitive)"},
        },
        "required": ["table", "key"],
    },
)
def lookup_tool(arguments: dict[str, Any], env: dict[str, Any]) -> Any:
    """Tables come from the sample: `metadata["tool_env"] = {"tables": {"capital": {"france": "paris"}}}`;
    table names and keys match case- and whitespace-insensitively."""
    tables = {_norm_key(k): v for k, v in (env.get("tables") or {}).items()}
    table = tables.get(_norm_key(arguments["table"]))
    if table is None:
        raise ToolError(f"lookup: no table {arguments['table']!r}")
    entries = {_norm_key(k): v for k, v in table.items()}
    if _norm_key(arguments["key"]) not in entries:
        raise ToolError(f"lookup: table {arguments['table']!r} has no key {arguments['key']!r}")
    return entries[_norm_key(arguments["key"])]
