"""BFCL v4 AST categories: adapter (schemas offered in the model's tool format) and leaderboard-style scoring.

The checker itself lives in `rewards.bfcl` so the same rules score evaluation files and reward tool-call rollouts.
The benchmark folder is laid out as the leaderboard ships it: `BFCL_v4_<category>.json` question files and
`possible_answer/BFCL_v4_<category>.json` (JSON Lines despite the suffix); `irrelevance` has no answer file.
"""

from __future__ import annotations

import copy
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any
from collections.abc import Iterator, Sequence

from evals.io import PredictionsError, check_id_sets, read_jsonl
from rewards.bfcl import CATEGORIES, category_of, check_output
from tasks.base import Sample, TaskSource, register_task_source

# BFCL type names -> JSON Schema, as the leaderboard converts them for tool-calling models.
JSON_SCHEMA_TYPES = {"dict": "object", "float": "number", "tuple": "array", "any": "string",
                     "string": "string", "integer": "integer", "boolean": "boolean", "array": "array"}


def _category_file(root: Path, category: str, sub: str = "") -> Path | None:
    folder = root / sub if sub else root
    pattern = re.compile(rf"BFCL_v\d+_{re.escape(category)}\.json")
    matches = sorted(p for p in folder.glob("BFCL_v*.json") if pattern.fullmatch(p.name))
    if len(matches) > 1:
        raise PredictionsError(f"{folder}: several files for category {category}: {[m.name for m in matches]}")
    return matches[0] if matches else None


def load_category(root: str | Path, category: str) -> list[dict[str, Any]]:
    """Entries `{"id", "question", "function", "ground_truth"}` of one category, ground truth joined by id."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown BFCL category {category!r}; supported: {', '.join(CATEGORIES)}")
    root = Path(root)
    questions = _category_file(root, category)
    if questions is None:
        raise FileNotFoundError(f"{root}: no BFCL_v*_{category}.json question file")
    entries = [row for _, row in read_jsonl(questions, what="BFCL question")]
    if category == "irrelevance":
        return [{**e, "ground_truth": None} for e in entries]
    answers_path = _category_file(root, category, "possible_answer")
    if answers_path is None:
        raise FileNotFoundError(f"{root / 'possible_answer'}: no BFCL_v*_{category}.json answer file")
    answers = {row["id"]: row["ground_truth"] for _, row in read_jsonl(answers_path, what="BFCL answer")}
    missing = [e["id"] for e in entries if e["id"] not in answers]
    if missing:
        raise PredictionsError(f"{answers_path}: {len(missing)} question ids have no answer (e.g. {missing[0]})")
    return [{**e, "ground_truth": answers[e["id"]]} for e in entries]


def to_tool_schema(function: dict[str, Any]) -> dict[str, Any]:
    """A BFCL function description as an OpenAI-style tool (`{"type": "function", "function": {...}}`)."""
    function = copy.deepcopy(function)

    def convert(schema: dict[str, Any]) -> dict[str, Any]:
        bfcl_type = schema.get("type", "string")
        if bfcl_type == "float":
            schema["description"] = (schema.get("description", "") + " This is a float type value.").strip()
        schema["type"] = JSON_SCHEMA_TYPES.get(bfcl_type, "string")
        if isinstance(schema.get("properties"), dict):
            schema["properties"] = {k: convert(v) for k, v in schema["properties"].items()}
        if isinstance(schema.get("items"), dict):
            schema["items"] = convert(schema["items"])
        return schema

    function["parameters"] = convert(function.get("parameters", {"type": "dict", "properties": {}}))
    return {"type": "function", "function": function}


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """Leaderboard result lines `{"id": ..., "result": "<raw model output>"}` (a decoded list is accepted too)."""
    preds = []
    for lineno, row in read_jsonl(path):
        where = f"{path}:{lineno}"
        if "id" not in row or "result" not in row:
            raise PredictionsError(f"{where}: needs 'id' and 'result'")
        if not isinstance(row["id"], str):
            raise PredictionsError(f"{where}: id must be a string")
        try:
            category_of(row["id"])
        except ValueError as exc:
            raise PredictionsError(f"{where}: {exc}") from None
        if not isinstance(row["result"], (str, list)):
            raise PredictionsError(f"{where}: result must be the raw model output (a string)")
        preds.append({"id": row["id"], "result": row["result"], "line": lineno})
    if not preds:
        raise PredictionsError(f"{path}: no predictions")
    return preds


def _as_text(result: str | list) -> str:
    """A result already decoded by a tool-calling handler (`[{name: args-json}]`) back as tool-call blocks."""
    if isinstance(result, str):
        return result
    blocks = []
    for call in result:
        if isinstance(call, dict) and len(call) == 1:
            name, args = next(iter(call.items()))
            args = json.loads(args) if isinstance(args, str) else args
            blocks.append("<tool_call>" + json.dumps({"name": name, "arguments": args}) + "</tool_call>")
        else:
            return json.dumps(result)
    return "".join(blocks) if blocks else "[]"


def evaluate(predictions: Sequence[dict[str, Any]], entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Accuracy per category present: `{"benchmark": "bfcl", "<category>": {"accuracy": pct, "n": int}, ...}`."""
    correct: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    errors: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for pred in predictions:
        entry = entries[pred["id"]]
        category = category_of(pred["id"])
        result = check_output(_as_text(pred["result"]), entry["function"], entry["ground_truth"], category)
        total[category] += 1
        correct[category] += result.valid
        if not result.valid:
            errors[category][result.error_type] += 1
    metrics: dict[str, Any] = {"benchmark": "bfcl"}
    for category in sorted(total, key=CATEGORIES.index):
        metrics[category] = {"accuracy": round(100.0 * correct[category] / total[category], 2),
                             "n": total[category], "errors": dict(errors[category])}
    return metrics


def score_file(predictions: str | Path, annotations: str | Path) -> dict[str, Any]:
    """Score a leaderboard result file; every question of each category present must be answered exactly once."""
    preds = read_predictions(predictions)
    present = sorted({category_of(p["id"]) for p in preds}, key=CATEGORIES.index)
    entries = {e["id"]: e for category in present for e in load_category(annotations, category)}
    check_id_sets(predictions, [p["id"] for p in preds], entries.keys(), key="id")
    return evaluate(preds, entries)


def predictions_from_generations(samples: Sequence[Sample], completions: Sequence[str]) -> list[dict[str, Any]]:
    """Result records from model text."""
    return [{"id": s.metadata["id"], "result": text} for s, text in zip(samples, completions)]


def entries_from_samples(samples: Sequence[Sample]) -> dict[str, dict[str, Any]]:
    """The question entries carried in the samples' references, by id."""
    return {s.metadata["id"]: {"function": s.reference["functions"], "ground_truth": s.reference["ground_truth"]}
            for s in samples}


class BFCLSource(TaskSource):
    """BFCL questions as tool-call tasks: first-turn messages, tools in OpenAI schema form, scored by `bfcl_ast`.

    annotations: the folder with `BFCL_v4_<category>.json` and `possible_answer/`; categories: default all six.
    """

    name = "bfcl"

    def __init__(self, annotations: str | Path, categories: Sequence[str] | None = None, limit: int | None = None,
                 domain: str = "tool", reward: str = "bfcl_ast") -> None:
        self.samples: list[Sample] = []
        for category in categories or CATEGORIES:
            for entry in load_category(annotations, category)[:limit]:
                messages = [dict(m) for m in entry["question"][0]]
                self.samples.append(Sample(
                    id=f"bfcl/{entry['id']}", domain=domain, messages=messages,
                    reference={"category": category, "functions": entry["function"],
                               "ground_truth": entry["ground_truth"]},
                    reward=reward, tools=[to_tool_schema(f) for f in entry["function"]],
                    metadata={"benchmark": "bfcl", "id": entry["id"], "category": category},
                ))

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def __len__(self) -> int:
        return len(self.samples)


@register_task_source("bfcl")
def bfcl_source(**kwargs: Any) -> BFCLSource:
    """YAML: `{source: bfcl, annotations: PATH, categories: [simple_python, ...], limit: N}` (limit is per category)."""
    return BFCLSource(**kwargs)
