"""Trivial predictors (whole video, its first / second / middle half) as floor baselines for the video benchmarks.

`python -m evals.trivial --benchmark qvhighlights --annotations FILE --predictor first_half --out preds.jsonl`
writes a predictions file in the benchmark's own format, to be scored with `evals.score`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any
from collections.abc import Sequence

from evals import charades, qvhighlights

PREDICTORS = {
    "whole": (0.0, 1.0),
    "first_half": (0.0, 0.5),
    "second_half": (0.5, 1.0),
    "middle_half": (0.25, 0.75),
}


def window(duration: float, predictor: str) -> list[float]:
    """The predictor's `[start, end]` in seconds for a video of `duration` seconds."""
    lo, hi = PREDICTORS[predictor]
    return [lo * duration, hi * duration]


def qvhighlights_predictions(annotations: Sequence[dict[str, Any]], predictor: str) -> list[dict[str, Any]]:
    """One window scored 1.0, and clip saliency 1 inside it, 0 outside."""
    out = []
    for ann in annotations:
        start, end = window(float(ann["duration"]), predictor)
        win = [start, end, 1.0]
        out.append({"qid": ann["qid"], "vid": ann.get("vid"), "pred_relevant_windows": [win],
                    "pred_saliency_scores": qvhighlights.windows_to_saliency([win], ann["duration"])})
    return out


def charades_predictions(annotations: Sequence[dict[str, Any]], predictor: str) -> list[dict[str, Any]]:
    """One ranked window per annotation line."""
    return [{"index": ann["index"], "pred_windows": [window(ann["duration"], predictor)]} for ann in annotations]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evals.trivial", description=__doc__)
    parser.add_argument("--benchmark", required=True, choices=["qvhighlights", "charades_sta"])
    parser.add_argument("--annotations", required=True)
    parser.add_argument("--predictor", required=True, choices=sorted(PREDICTORS))
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.benchmark == "qvhighlights":
        preds = qvhighlights_predictions(qvhighlights.load_annotations(args.annotations), args.predictor)
    else:
        preds = charades_predictions(charades.load_annotations(args.annotations), args.predictor)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(p) + "\n" for p in preds), encoding="utf-8")
    print(f"wrote {len(preds)} predictions to {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
