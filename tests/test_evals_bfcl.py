"""BFCL adapter and result-file scoring on the shared v4 files: perfect answers, known-bad items, bad input."""

import json
from pathlib import Path

import pytest

from evals import bfcl
from evals.io import PredictionsError
from evals.score import format_table, score, score_generations
from rewards.bfcl import CATEGORIES

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "bfcl"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="shared BFCL files absent")
# Two live_simple items require parameters whose accepted-value list is empty: no output can pass them.
UNSATISFIABLE = {"live_simple_106-63-0", "live_simple_112-68-0"}


def perfect_text(entry):
    """A Python call list built from the ground truth: required parameters and non-omissible ones, first value."""
    def first(accepted):
        return next(a for a in accepted if a != "")

    def value(v):
        if isinstance(v, dict):
            return {k: value(first(acc)) for k, acc in v.items() if any(a != "" for a in acc)}
        return [value(x) for x in v] if isinstance(v, list) else v

    calls = []
    for call in entry["ground_truth"]:
        (name, params), = call.items()
        function = next(f for f in entry["function"] if f["name"] == name)
        required = function["parameters"].get("required", [])
        args = [f"{p}={value(first(acc))!r}" for p, acc in params.items()
                if (p in required or "" not in acc) and any(a != "" for a in acc)]
        calls.append(f"{name}({', '.join(args)})")
    return "[" + ", ".join(calls) + "]"


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_perfect_answers_score_100_except_unsatisfiable_items(tmp_path):
    rows = []
    for category in CATEGORIES:
        for entry in bfcl.load_category(DATA, category):
            text = "None of the functions fit." if category == "irrelevance" else perfect_text(entry)
            rows.append({"id": entry["id"], "result": text})
    out = tmp_path / "metrics.json"
    m = score("bfcl", write(tmp_path / "result.jsonl", rows), DATA, out=out)
    for category in CATEGORIES:
        if category != "live_simple":
            assert m[category]["accuracy"] == 100.0, category
    assert m["live_simple"] == {"accuracy": round(100 * 256 / 258, 2), "n": 258,
                                "errors": {"missing_required": 2}}
    assert json.loads(out.read_text())["simple_python"] == {"accuracy": 100.0, "n": 400, "errors": {}}
    assert "parallel_multiple" in format_table(m)


def test_wrong_answers_and_category_from_id(tmp_path):
    rows = [{"id": e["id"], "result": "[" + e["function"][0]["name"] + "()]"}
            for e in bfcl.load_category(DATA, "simple_python")]
    m = score("bfcl", write(tmp_path / "r.jsonl", rows), DATA)
    assert list(k for k in m if k in CATEGORIES) == ["simple_python"] and m["simple_python"]["accuracy"] == 0.0


def test_missing_duplicate_and_unknown_ids_are_errors(tmp_path):
    ids = [e["id"] for e in bfcl.load_category(DATA, "parallel")]
    rows = [{"id": i, "result": "[]"} for i in ids[:-1]]
    with pytest.raises(PredictionsError, match="1 of 200 annotated ids missing"):
        score("bfcl", write(tmp_path / "a.jsonl", rows), DATA)
    with pytest.raises(PredictionsError, match="1 duplicate ids"):
        score("bfcl", write(tmp_path / "b.jsonl", rows + [rows[0], {"id": ids[-1], "result": ""}]), DATA)
    with pytest.raises(PredictionsError, match=r"c\.jsonl:1: id 'exec_simple_1' does not start with a known"):
        score("bfcl", write(tmp_path / "c.jsonl", [{"id": "exec_simple_1", "result": ""}]), DATA)
    with pytest.raises(ValueError, match="unknown benchmark 'bfcl_v9'"):
        score("bfcl_v9", tmp_path / "c.jsonl", DATA)


def test_adapter_offers_schemas_in_tool_format_and_scores_generations():
    source = bfcl.BFCLSource(annotations=DATA, categories=["simple_python", "irrelevance"], limit=3)
    samples = list(source)
    assert len(samples) == 6 and samples[0].reward == "bfcl_ast" and samples[0].domain == "tool"
    tool = samples[0].tools[0]
    assert tool["type"] == "function" and tool["function"]["name"] == "calculate_triangle_area"
    assert tool["function"]["parameters"]["type"] == "object"  # BFCL "dict" -> JSON Schema "object"
    assert samples[0].messages[0]["role"] == "user" and samples[0].metadata["category"] == "simple_python"
    texts = ['<tool_call>{"name": "calculate_triangle_area", "arguments": {"base": 10, "height": 5}}</tool_call>',
             "no idea", "no idea", "no idea", "no idea", "[some_function(x=1)]"]
    m = score_generations("bfcl", samples, texts)
    assert m["simple_python"] == {"accuracy": 33.33, "n": 3, "errors": {"decode_failed": 2}}
    assert m["irrelevance"]["accuracy"] == 66.67
