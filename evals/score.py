"""`score`: a predictions file in a benchmark's own format, scored by its official protocol; the same scorers
serve `eval` on a checkpoint's generations (`score_generations`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any
from collections.abc import Sequence

from evals import bfcl, charades, niah, qvhighlights
from evals.io import PredictionsError
from tasks.base import Sample

BENCHMARKS = ("qvhighlights", "charades_sta", "bfcl", "niah")
ALIASES = {"qvh": "qvhighlights", "charades": "charades_sta", "charades-sta": "charades_sta", "bfcl_v4": "bfcl"}


def canonical(benchmark: str) -> str:
    """The benchmark's canonical name; a clear error listing the known ones otherwise."""
    name = ALIASES.get(benchmark.lower(), benchmark.lower())
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; known: {', '.join(BENCHMARKS)}")
    return name


def score(benchmark: str, predictions: str | Path, annotations: str | Path | None = None,
          out: Path | str | None = None, lengths: str | Path | None = None) -> dict[str, Any]:
    """Score `predictions` against the user's copy of the benchmark files; write JSON to `out` when given.

    annotations: QVHighlights `.jsonl`; Charades-STA `charades_sta_test.txt` (`lengths`: the Charades CSV,
    default beside it); BFCL the folder with `BFCL_v4_<category>.json` and `possible_answer/`; NIAH needs none
    (its predictions carry the expected values).
    """
    name = canonical(benchmark)
    if name != "niah" and annotations is None:
        raise ValueError(f"{name}: --annotations is required")
    if name == "qvhighlights":
        metrics = qvhighlights.score_file(predictions, annotations)
    elif name == "charades_sta":
        metrics = charades.score_file(predictions, annotations, lengths)
    elif name == "bfcl":
        metrics = bfcl.score_file(predictions, annotations)
    else:
        metrics = niah.evaluate(niah.read_predictions(predictions))
    metrics["predictions"] = str(predictions)
    if out is not None:
        write_json(metrics, out)
    return metrics


def score_generations(benchmark: str, samples: Sequence[Sample], completions: Sequence[str]) -> dict[str, Any]:
    """Score model text for the adapter's samples with the benchmark's own scorer (same code as `score`)."""
    if len(samples) != len(completions):
        raise ValueError(f"{len(samples)} samples but {len(completions)} completions")
    name = canonical(benchmark)
    if name == "qvhighlights":
        preds = qvhighlights.predictions_from_generations(samples, completions)
        return qvhighlights.evaluate(preds, qvhighlights.annotations_from_samples(samples))
    if name == "charades_sta":
        preds = charades.predictions_from_generations(samples, completions)
        return charades.evaluate(preds, charades.annotations_from_samples(samples))
    if name == "bfcl":
        preds = bfcl.predictions_from_generations(samples, completions)
        return bfcl.evaluate(preds, bfcl.entries_from_samples(samples))
    return niah.evaluate(niah.records_from_generations(samples, completions))


def write_json(metrics: dict[str, Any], out: Path | str) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")


def _table(rows: list[tuple[str, ...]], title: str) -> str:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = [title]
    for k, row in enumerate(rows):
        lines.append("  ".join(str(cell).rjust(w) if j else str(cell).ljust(w) for j, (cell, w) in
                               enumerate(zip(row, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


def format_table(metrics: dict[str, Any]) -> str:
    """A terminal table of a metrics dict returned by `score` / `score_generations`."""
    name = metrics.get("benchmark")
    if name == "qvhighlights":
        rows = [("metric", "value")] + [(k, _fmt(v)) for k, v in metrics["brief"].items()]
        return _table(rows, f"QVHighlights (n={metrics['n']}; official standalone_eval keys)")
    if name == "charades_sta":
        rows = [("protocol", "metric", "value")]
        rows += [("llm_timelens (IoU>=t)", k, _fmt(v)) for k, v in metrics["llm_timelens"].items()]
        rows += [("2d_tan (IoU>t)", k, _fmt(v)) for k, v in metrics["2d_tan"].items()]
        title = f"Charades-STA (n={metrics['n']}"
        title += f", {metrics['unparsed']} answers without an interval)" if metrics.get("unparsed") else ")"
        return _table(rows, title)
    if name == "bfcl":
        cats = [k for k in bfcl.CATEGORIES if k in metrics]
        rows = [("category", "accuracy", "n")] + [(c, _fmt(metrics[c]["accuracy"]), str(metrics[c]["n"])) for c in cats]
        return _table(rows, "BFCL v4 AST")
    if name == "niah":
        rows = [("group", "score", "n"), ("all", _fmt(metrics.get("score")), str(metrics["n"]))]
        for key in ("length", "depth", "variant"):
            rows += [(f"{key}={k}", _fmt(v["score"]), str(v["n"])) for k, v in metrics.get(f"by_{key}", {}).items()]
        return _table(rows, "Needle in a haystack (fraction of needle values recalled, %)")
    raise ValueError(f"metrics of unknown benchmark {name!r}")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The `score` arguments (reused by the console script's subcommand)."""
    parser = parser or argparse.ArgumentParser(prog="score", description=__doc__)
    parser.add_argument("--benchmark", required=True, help=f"one of {', '.join(BENCHMARKS)}")
    parser.add_argument("--predictions", required=True, help="predictions file in the benchmark's format")
    parser.add_argument("--annotations", help="the benchmark's annotation file or folder (not needed for niah)")
    parser.add_argument("--lengths", help="Charades-STA: the Charades CSV with video lengths (default: beside it)")
    parser.add_argument("--out", help="write the metrics JSON here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: print the table, write JSON; bad input exits 2 with the file/line/problem on stderr."""
    args = build_parser().parse_args(argv)
    try:
        metrics = score(args.benchmark, args.predictions, args.annotations, args.out, args.lengths)
    except (PredictionsError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(metrics))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
