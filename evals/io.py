"""Reading prediction and annotation files with errors that name the file, line and problem.

A scorer must never shift a number silently because of a malformed line, so every reader here fails loudly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from collections.abc import Iterable


class PredictionsError(ValueError):
    """A predictions (or annotation) file is malformed; the message names the file, line and problem."""


def read_jsonl(path: str | Path, what: str = "predictions") -> list[tuple[int, dict[str, Any]]]:
    """`(line number, object)` for every non-blank line of a JSON Lines file (line numbers are 1-based)."""
    path = Path(path)
    if not path.is_file():
        raise PredictionsError(f"{what} file {path} does not exist")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PredictionsError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise PredictionsError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            rows.append((lineno, obj))
    return rows


def check_id_sets(path: str | Path, predicted: Iterable[Any], expected: Iterable[Any], key: str = "id") -> None:
    """Fail on duplicate, missing or unknown ids, giving the counts and a few examples of each."""
    predicted = list(predicted)
    expected_set = set(expected)
    seen: set[Any] = set()
    duplicates = []
    for item in predicted:
        if item in seen:
            duplicates.append(item)
        seen.add(item)
    missing = [item for item in expected_set if item not in seen]
    unknown = [item for item in seen if item not in expected_set]
    problems = []
    if duplicates:
        problems.append(f"{len(duplicates)} duplicate {key}s (e.g. {_examples(duplicates)})")
    if missing:
        problems.append(f"{len(missing)} of {len(expected_set)} annotated {key}s missing (e.g. {_examples(missing)})")
    if unknown:
        problems.append(f"{len(unknown)} {key}s not in the annotations (e.g. {_examples(unknown)})")
    if problems:
        raise PredictionsError(f"{path}: " + "; ".join(problems))


def _examples(items: list[Any], k: int = 3) -> str:
    shown = sorted(items, key=str)[:k]
    return ", ".join(repr(item) for item in shown)


def number(value: Any, where: str, field: str) -> float:
    """`value` as a float, or a PredictionsError naming `where` (file:line) and the field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PredictionsError(f"{where}: {field} must be a number, got {value!r}")
    return float(value)
