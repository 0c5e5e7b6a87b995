"""Charades-STA (Gao et al., 2017) test split: adapter and both scoring protocols the literature reports.

- `llm_timelens`: the LLM temporal-grounding protocol (TimeLens and most video-LLM papers): the top-1 window,
  a hit if IoU >= t for t = 0.3 / 0.5 / 0.7, and mIoU = mean top-1 IoU.
- `2d_tan`: the proposal-ranking protocol of 2D-TAN: R@1 and R@5 over the ranked windows as given, a hit if
  IoU > t (strictly) for t = 0.5 / 0.7. (2D-TAN applies its own NMS to its proposals before this step; a
  predictions file here is taken as already ranked.)
Ground-truth ends are clipped to the video length from the Charades CSV, as 2D-TAN's loader does.
IoU is overlap / span of the two windows (equal to overlap / union whenever they overlap; 0 when they do not).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any
from collections.abc import Iterator, Sequence

import numpy as np

from evals.io import PredictionsError, number, read_jsonl
from evals.video import SkipLog, find_video, parse_intervals_lazily
from tasks.base import Sample, TaskSource, VideoPart, register_task_source

LLM_THRESHOLDS = (0.3, 0.5, 0.7)
TAN_THRESHOLDS = (0.5, 0.7)
TAN_RANKS = (1, 5)
LENGTHS_CSV = "Charades_v1_test.csv"


def load_video_lengths(path: str | Path) -> dict[str, float]:
    """`{video id: length in seconds}` from the Charades CSV (`id`, ..., `length`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Charades video-length CSV {path} does not exist")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"id", "length"} <= set(reader.fieldnames):
            raise PredictionsError(f"{path}: expected columns 'id' and 'length', got {reader.fieldnames}")
        return {row["id"]: float(row["length"]) for row in reader}


def load_annotations(path: str | Path, lengths: str | Path | None = None) -> list[dict[str, Any]]:
    """Annotation lines `<vid> <start> <end>##<sentence>` in file order, ends clipped to the video length.

    lengths: the Charades CSV; by default `Charades_v1_test.csv` next to the annotation file.
    Each record: `{"index", "vid", "sentence", "window": [start, end], "duration"}`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Charades-STA annotation file {path} does not exist")
    durations = load_video_lengths(lengths if lengths is not None else path.parent / LENGTHS_CSV)
    records = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                head, sentence = line.rstrip("\n").split("##", 1)
                vid, start, end = head.split()
                start, end = float(start), float(end)
            except ValueError:
                raise PredictionsError(f"{path}:{lineno}: expected '<vid> <start> <end>##<sentence>'") from None
            if vid not in durations:
                raise PredictionsError(f"{path}:{lineno}: video {vid} has no length in the Charades CSV")
            duration = durations[vid]
            end = min(end, duration)
            if start >= end:
                raise PredictionsError(f"{path}:{lineno}: empty window after clipping to the video length")
            records.append({"index": len(records), "vid": vid, "sentence": sentence.strip(),
                            "window": [start, end], "duration": duration})
    return records


def iou(pred: Sequence[float], gt: Sequence[float]) -> float:
    """Temporal IoU of two windows (overlap / span; 0 for a zero span)."""
    inter = max(0.0, min(pred[1], gt[1]) - max(pred[0], gt[0]))
    span = max(pred[1], gt[1]) - min(pred[0], gt[0])
    return inter / span if span > 0 else 0.0


def read_predictions(path: str | Path, annotations: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Prediction lines, one per annotation line in file order: `{"pred_windows": [[s, e], ...]}` (ranked) or
    `{"answer": "<model text>"}`. An optional `"index"` (0-based annotation line) is checked when present."""
    rows = read_jsonl(path)
    if len(rows) != len(annotations):
        raise PredictionsError(
            f"{path}: {len(rows)} prediction lines for {len(annotations)} annotation lines (one per line, in order)")
    preds = []
    for k, (lineno, row) in enumerate(rows):
        where = f"{path}:{lineno}"
        if "index" in row and row["index"] != k:
            raise PredictionsError(f"{where}: index {row['index']!r} but this is prediction {k} (file order)")
        preds.append(validate_prediction(row, where))
    return preds


def validate_prediction(row: dict[str, Any], where: str) -> dict[str, Any]:
    """One prediction line: ranked `pred_windows` (floats, start <= end) or a free-text `answer`."""
    if "pred_windows" in row:
        windows = row["pred_windows"]
        if not isinstance(windows, list):
            raise PredictionsError(f"{where}: pred_windows must be a list of [start, end]")
        parsed = []
        for k, window in enumerate(windows):
            if not isinstance(window, (list, tuple)) or len(window) < 2:
                raise PredictionsError(f"{where}: pred_windows[{k}] must be [start, end], got {window!r}")
            start, end = (number(v, where, f"pred_windows[{k}]") for v in window[:2])
            if start > end:
                raise PredictionsError(f"{where}: pred_windows[{k}] has start {start} > end {end}")
            parsed.append([start, end])
        return {"pred_windows": parsed}
    if "answer" in row:
        if not isinstance(row["answer"], str):
            raise PredictionsError(f"{where}: answer must be a string")
        return {"answer": row["answer"]}
    raise PredictionsError(f"{where}: needs 'pred_windows' or 'answer'")


def windows_of(prediction: dict[str, Any]) -> tuple[list[list[float]], bool]:
    """Ranked windows of a prediction and whether any could be read (answers go through the interval parser;
    a reversed interval in free text counts as no interval)."""
    if "pred_windows" in prediction:
        return prediction["pred_windows"], True
    intervals = [[s, e] for s, e in parse_intervals_lazily(prediction["answer"]) if s <= e]
    return intervals, bool(intervals)


def evaluate(predictions: Sequence[dict[str, Any]], annotations: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Both protocols' metrics in percent: `{"llm_timelens": {"R1@0.3", ..., "mIoU"}, "2d_tan": {"R1@0.5", ...}}`."""
    if len(predictions) != len(annotations):
        raise PredictionsError(f"{len(predictions)} predictions for {len(annotations)} annotations")
    top1 = np.zeros(len(annotations))
    tan_hits = np.zeros((len(TAN_RANKS), len(TAN_THRESHOLDS), len(annotations)), dtype=bool)
    unparsed = 0
    for i, (pred, ann) in enumerate(zip(predictions, annotations)):
        windows, readable = windows_of(pred)
        unparsed += not readable
        ious = np.array([iou(w, ann["window"]) for w in windows[: max(TAN_RANKS)]])
        top1[i] = ious[0] if len(ious) else 0.0
        for r, rank in enumerate(TAN_RANKS):
            for t, thr in enumerate(TAN_THRESHOLDS):
                tan_hits[r, t, i] = bool(np.any(ious[:rank] > thr))
    n = max(len(annotations), 1)
    llm = {f"R1@{thr}": _pct(np.sum(top1 >= thr) / n) for thr in LLM_THRESHOLDS}
    llm["mIoU"] = _pct(float(np.sum(top1)) / n)
    tan = {f"R{rank}@{thr}": _pct(float(np.mean(tan_hits[r, t])) if len(annotations) else 0.0)
           for r, rank in enumerate(TAN_RANKS) for t, thr in enumerate(TAN_THRESHOLDS)}
    return {"benchmark": "charades_sta", "n": len(annotations), "unparsed": unparsed,
            "llm_timelens": llm, "2d_tan": tan}


def _pct(value: float) -> float:
    return round(100.0 * float(value), 2)


def score_file(predictions: str | Path, annotations: str | Path, lengths: str | Path | None = None) -> dict[str, Any]:
    """Score a predictions file against the annotation file (video lengths from the CSV beside it by default)."""
    anns = load_annotations(annotations, lengths)
    return evaluate(read_predictions(predictions, anns), anns)


def predictions_from_generations(samples: Sequence[Sample], completions: Sequence[str]) -> list[dict[str, Any]]:
    """Prediction records from model text (parsed at scoring time)."""
    return [{"answer": text} for text in completions]


def annotations_from_samples(samples: Sequence[Sample]) -> list[dict[str, Any]]:
    """The annotation records carried in the samples' references."""
    return [dict(sample.reference) for sample in samples]


PROMPT = (
    "The video is {duration:.1f} seconds long. When does the following happen: \"{sentence}\"? "
    "Answer with the start and end time in seconds as \"start - end\"."
)


class CharadesSTASource(TaskSource):
    """Charades-STA queries as eval tasks; `reference` is the clipped window with the video length.

    annotations: `charades_sta_test.txt`; lengths: the Charades CSV (default: `Charades_v1_test.csv` beside it);
    video_dir: folder of `<vid>.mp4`; missing videos are skipped and counted in `skipped`. With `video_dir=None`
    no file is checked and the video part has no path (annotation-only use).
    """

    name = "charades_sta"

    def __init__(self, annotations: str | Path, lengths: str | Path | None = None,
                 video_dir: str | Path | None = None, fps: float = 1.0, limit: int | None = None,
                 domain: str = "video", reward: str | None = None) -> None:
        self.skipped = SkipLog()
        self.samples: list[Sample] = []
        video_root = Path(video_dir) if video_dir is not None else None
        for ann in load_annotations(annotations, lengths):
            if limit is not None and len(self.samples) >= limit:
                break
            sample_id = f"charades_sta/{ann['index']}"
            path = None
            if video_root is not None:
                found = find_video(video_root, ann["vid"])
                if found is None:
                    self.skipped.add("video missing", sample_id)
                    continue
                path = str(found)
            text = PROMPT.format(duration=ann["duration"], sentence=ann["sentence"])
            content = [{"type": "video", "video": VideoPart(path=path, fps=fps)}, {"type": "text", "text": text}]
            self.samples.append(Sample(
                id=sample_id, domain=domain, messages=[{"role": "user", "content": content}],
                reference=dict(ann), reward=reward,
                metadata={"benchmark": "charades_sta", "index": ann["index"], "vid": ann["vid"],
                          "duration": ann["duration"]},
            ))

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def __len__(self) -> int:
        return len(self.samples)


@register_task_source("charades_sta")
def charades_sta_source(**kwargs: Any) -> CharadesSTASource:
    """YAML: `{source: charades_sta, annotations: PATH, lengths: CSV, video_dir: PATH, fps: 1, limit: N}`."""
    return CharadesSTASource(**kwargs)
