"""QVHighlights (Lei et al., 2021): adapter and the benchmark's official scoring protocol.

Scoring follows the public evaluator (Moment-DETR `standalone_eval/eval.py`) definition by definition, so the
`brief` numbers agree with it to the printed precision:
- moment retrieval (MR): per query, the first 10 listed windows are stably sorted by score and greedily matched
  one-to-one to ground-truth windows per IoU threshold (hit: IoU >= t); AP is VOC-interpolated; mAP is the mean
  over queries. R1@t compares the first listed window with its best-overlapping ground-truth window.
  Length buckets keep only the ground-truth windows of that length ((0,10], (10,30], (30,150] s).
- highlight detection (HL): per annotator, clips rated >= 2 / 3 / 4 are positives; predicted clip scores are cut
  or zero-padded to `duration / 2` clips; AP treats tied scores as one cut-off; HIT@1 looks at the first maximum.
Deviation, on inputs the official script cannot score (it raises): a query with no predicted window scores AP 0
and an R1 miss; empty `pred_saliency_scores` is an HL HIT@1 miss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from collections.abc import Iterator, Sequence

import numpy as np

from evals.io import PredictionsError, check_id_sets, number, read_jsonl
from evals.video import SkipLog, find_video, parse_intervals_lazily
from tasks.base import Sample, TaskSource, VideoPart, register_task_source

THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
LENGTH_BUCKETS: dict[str, tuple[float, float] | None] = {
    "short": (0.0, 10.0),
    "middle": (10.0, 30.0),
    "long": (30.0, 150.0),
    "full": None,
}
SALIENCY_LEVELS: dict[str, int] = {"Fair": 2, "Good": 3, "VeryGood": 4}
CLIP_SECONDS = 2
MAX_PRED_WINDOWS = 10
BRIEF_KEYS = (
    "MR-full-R1@0.5", "MR-full-R1@0.7", "MR-full-mAP", "MR-full-mAP@0.5", "MR-full-mAP@0.75",
    "MR-long-mAP", "MR-middle-mAP", "MR-short-mAP",
    "HL-min-Fair-mAP", "HL-min-Fair-Hit1", "HL-min-Good-mAP", "HL-min-Good-Hit1",
    "HL-min-VeryGood-mAP", "HL-min-VeryGood-Hit1",
)


def _pct(value: float) -> float | None:
    """Percent with two decimals, rounded as the official script does (`float(f"{100 * v:.2f}")`)."""
    if value is None or not np.isfinite(value):
        return None
    return float(f"{100 * value:.2f}")


# ----------------------------------------------------------------------------------------------- annotations
def load_annotations(path: str | Path) -> list[dict[str, Any]]:
    """The benchmark's JSON Lines file (`highlight_val_release.jsonl`), validated and kept in its own keys."""
    rows = []
    for lineno, row in read_jsonl(path, what="QVHighlights annotations"):
        for key in ("qid", "duration", "relevant_windows"):
            if key not in row:
                raise PredictionsError(f"{path}:{lineno}: annotation lacks {key!r}")
        rows.append(row)
    check_id_sets(path, [r["qid"] for r in rows], {r["qid"] for r in rows}, key="qid")
    return rows


# ----------------------------------------------------------------------------------------------- predictions
def read_predictions(path: str | Path, annotations: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Submission lines (`qid`, `pred_relevant_windows` [[s, e, score], ...], `pred_saliency_scores`), validated."""
    rows = read_jsonl(path)
    if not rows:
        raise PredictionsError(f"{path}: no predictions")
    preds = [validate_prediction(row, f"{path}:{lineno}") for lineno, row in rows]
    check_id_sets(path, [p["qid"] for p in preds], [a["qid"] for a in annotations], key="qid")
    for field in ("pred_relevant_windows", "pred_saliency_scores"):
        having = sum(field in p for p in preds)
        if 0 < having < len(preds):
            raise PredictionsError(f"{path}: {field} is given on {having} of {len(preds)} lines (all or none)")
    return preds


def validate_prediction(row: dict[str, Any], where: str) -> dict[str, Any]:
    """One submission line checked field by field; windows become `[start, end, score]` floats."""
    if "qid" not in row:
        raise PredictionsError(f"{where}: missing 'qid'")
    if "pred_relevant_windows" not in row and "pred_saliency_scores" not in row:
        raise PredictionsError(f"{where}: needs 'pred_relevant_windows' and/or 'pred_saliency_scores'")
    out: dict[str, Any] = {"qid": row["qid"]}
    if "pred_relevant_windows" in row:
        windows = row["pred_relevant_windows"]
        if not isinstance(windows, list):
            raise PredictionsError(f"{where}: pred_relevant_windows must be a list")
        parsed = []
        for k, window in enumerate(windows):
            if not isinstance(window, (list, tuple)) or len(window) < 3:
                raise PredictionsError(
                    f"{where}: pred_relevant_windows[{k}] must be [start, end, score], got {window!r}")
            start, end, score = (number(v, where, f"pred_relevant_windows[{k}]") for v in window[:3])
            if start > end:
                raise PredictionsError(f"{where}: pred_relevant_windows[{k}] has start {start} > end {end}")
            parsed.append([start, end, score])
        out["pred_relevant_windows"] = parsed
    if "pred_saliency_scores" in row:
        scores = row["pred_saliency_scores"]
        if not isinstance(scores, list):
            raise PredictionsError(f"{where}: pred_saliency_scores must be a list")
        out["pred_saliency_scores"] = [number(v, where, "pred_saliency_scores") for v in scores]
    return out


# ----------------------------------------------------------------------------------------------- moment retrieval
def cross_iou(window: Sequence[float], gts: np.ndarray) -> np.ndarray:
    """IoU of one window `[2]` with each ground-truth window `gts [M, 2]` -> `[M]`.

    The union is the sum of the lengths minus the overlap (the official `compute_temporal_iou_batch_cross`)."""
    inter = np.clip(np.minimum(window[1], gts[:, 1]) - np.maximum(window[0], gts[:, 0]), 0, None)
    union = (window[1] - window[0]) + (gts[:, 1] - gts[:, 0]) - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return inter / union


def paired_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two windows with the official R1 formula (overlap / span of both; 0 when the span is 0)."""
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    span = max(a[1], b[1]) - min(a[0], b[0])
    return inter / span if span != 0 else 0.0


def voc_ap(precision: np.ndarray, recall: np.ndarray) -> float:
    """VOC (2011+) interpolated AP of a precision/recall sequence ordered by rank."""
    mprec = np.concatenate([[0.0], precision, [0.0]])
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mprec = np.maximum.accumulate(mprec[::-1])[::-1]
    idx = np.where(mrec[1:] != mrec[:-1])[0] + 1
    return float(np.sum((mrec[idx] - mrec[idx - 1]) * mprec[idx]))


def detection_ap(gts: np.ndarray, preds: Sequence[Sequence[float]],
                 thresholds: Sequence[float] = THRESHOLDS) -> np.ndarray:
    """Per-threshold AP `[T]` of one query's ranked windows `preds [(s, e, score)]` against `gts [M, 2]`.

    Predictions are stably sorted by descending score; each takes, per threshold, the highest-IoU unmatched
    ground truth with IoU >= t (candidates in `np.argsort(iou)[::-1]` order, as the official code visits them).
    """
    n_thr, n_pred, n_gt = len(thresholds), len(preds), len(gts)
    if n_pred == 0:
        return np.zeros(n_thr)
    order = sorted(range(n_pred), key=lambda i: -preds[i][2])
    tp = np.zeros((n_thr, n_pred))
    locked = np.zeros((n_thr, n_gt), dtype=bool)
    for rank, i in enumerate(order):
        ious = cross_iou(preds[i], gts)
        candidates = np.argsort(ious)[::-1]
        for t, thr in enumerate(thresholds):
            for j in candidates:
                if ious[j] < thr:
                    break
                if locked[t, j]:
                    continue
                tp[t, rank] = 1.0
                locked[t, j] = True
                break
    cum_tp = np.cumsum(tp, axis=1)
    recall = cum_tp / float(n_gt)
    precision = cum_tp / np.arange(1, n_pred + 1)
    return np.array([voc_ap(precision[t], recall[t]) for t in range(n_thr)])


def _bucket(annotations: Sequence[dict[str, Any]], bounds: tuple[float, float] | None) -> list[dict[str, Any]]:
    """Queries with ground-truth windows of length in (lo, hi], keeping only those windows."""
    if bounds is None:
        return list(annotations)
    lo, hi = bounds
    out = []
    for ann in annotations:
        kept = [w for w in ann["relevant_windows"] if lo < w[1] - w[0] <= hi]
        if kept:
            out.append({**ann, "relevant_windows": kept})
    return out


def moment_retrieval(preds: dict[Any, list[list[float]]], annotations: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """MR metrics per length bucket: `{bucket: {"MR-mAP": {thr|"average": pct}, "MR-R1": {thr: pct}, "n": int}}`."""
    out: dict[str, Any] = {}
    for name, bounds in LENGTH_BUCKETS.items():
        anns = _bucket(annotations, bounds)
        aps, r1 = [], []
        for ann in anns:
            gts = np.asarray(ann["relevant_windows"], dtype=float).reshape(-1, 2)
            windows = preds[ann["qid"]]
            aps.append(detection_ap(gts, windows[:MAX_PRED_WINDOWS]))
            if windows:
                first = windows[0][:2]
                best = int(np.argmax(cross_iou(first, gts)))
                iou = paired_iou(first, gts[best])
                r1.append([iou >= thr for thr in THRESHOLDS])
            else:
                r1.append([False] * len(THRESHOLDS))
        if anns:
            ap_thr = np.mean(np.stack(aps), axis=0)
            r1_thr = np.mean(np.asarray(r1, dtype=float), axis=0)
            mean_ap = {str(thr): _pct(v) for thr, v in zip(THRESHOLDS, ap_thr)}
            mean_ap["average"] = _pct(float(np.mean(ap_thr)))
            recall = {str(thr): _pct(v) for thr, v in zip(THRESHOLDS, r1_thr)}
        else:
            mean_ap = {str(thr): None for thr in THRESHOLDS} | {"average": None}
            recall = {str(thr): None for thr in THRESHOLDS}
        out[name] = {"MR-mAP": mean_ap, "MR-R1": recall, "n": len(anns)}
    return out


# ----------------------------------------------------------------------------------------------- highlights
def saliency_ap(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Interpolated AP over distinct score cut-offs (tied scores are one cut-off), as the official `get_ap`.

    y_true: `[N]` in {0, 1}; y_score: `[N]`. All-negative -> 0, all-positive -> 1. The value is the mean, over
    the distinct positive recall levels, of the best precision reached at that recall or beyond.
    """
    if np.all(y_true == y_true[0]):
        return 1.0 if y_true[0] == 1 else 0.0
    order = np.argsort(-y_score, kind="mergesort")
    scores, labels = y_score[order], y_true[order]
    cut = np.r_[np.where(np.diff(scores) != 0)[0], len(scores) - 1]  # last index of each tie group
    tps = np.cumsum(labels)[cut]
    precision = tps / (cut + 1.0)
    recall = (tps / tps[-1]).astype(np.float32)
    full = int(np.searchsorted(tps, tps[-1]))  # stop at the first cut-off reaching full recall
    precision = np.r_[precision[full::-1], 1.0]
    recall = np.r_[recall[full::-1], np.float32(0.0)]
    precision = np.maximum.accumulate(precision)
    steps = np.where(np.diff(recall) != 0)[0]
    return float(np.mean(precision[steps]))


def gt_clip_scores(ann: dict[str, Any]) -> np.ndarray:
    """Per-clip annotator ratings `[duration // 2, 3]` (0 outside the relevant clips)."""
    n_clips = int(ann["duration"] / CLIP_SECONDS)
    scores = np.zeros((n_clips, 3))
    if ann.get("relevant_clip_ids"):
        scores[np.asarray(ann["relevant_clip_ids"])] = np.asarray(ann["saliency_scores"])
    return scores


def highlight_detection(preds: dict[Any, list[float]], annotations: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """HL metrics: `{"HL-min-<level>": {"HL-mAP": pct, "HL-Hit1": pct}}` for Fair / Good / VeryGood."""
    out = {}
    ratings = {ann["qid"]: gt_clip_scores(ann) for ann in annotations}
    for level, min_score in SALIENCY_LEVELS.items():
        aps, hits = [], []
        for ann in annotations:
            positive = (ratings[ann["qid"]] >= min_score).astype(float)  # [clips, 3]
            raw = np.asarray(preds[ann["qid"]], dtype=float)
            if raw.size and int(np.argmax(raw)) < len(positive):
                hits.append(float(np.max(positive[int(np.argmax(raw))])))
            else:
                hits.append(0.0)
            fitted = np.zeros(len(positive))
            fitted[: min(len(raw), len(positive))] = raw[: len(positive)]
            aps.extend(saliency_ap(positive[:, w], fitted) for w in range(positive.shape[1]))
        out[f"HL-min-{level}"] = {"HL-mAP": _pct(float(np.mean(aps))), "HL-Hit1": _pct(float(np.mean(hits)))}
    return out


# ----------------------------------------------------------------------------------------------- entry points
def evaluate(predictions: Sequence[dict[str, Any]], annotations: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Official QVHighlights metrics of validated predictions; `brief` carries the evaluator's own key names."""
    metrics: dict[str, Any] = {"benchmark": "qvhighlights", "n": len(annotations)}
    brief: dict[str, Any] = {}
    if predictions and "pred_relevant_windows" in predictions[0]:
        mr = moment_retrieval({p["qid"]: p["pred_relevant_windows"] for p in predictions}, annotations)
        metrics.update(mr)
        brief.update({
            "MR-full-R1@0.5": mr["full"]["MR-R1"]["0.5"],
            "MR-full-R1@0.7": mr["full"]["MR-R1"]["0.7"],
            "MR-full-mAP": mr["full"]["MR-mAP"]["average"],
            "MR-full-mAP@0.5": mr["full"]["MR-mAP"]["0.5"],
            "MR-full-mAP@0.75": mr["full"]["MR-mAP"]["0.75"],
            "MR-long-mAP": mr["long"]["MR-mAP"]["average"],
            "MR-middle-mAP": mr["middle"]["MR-mAP"]["average"],
            "MR-short-mAP": mr["short"]["MR-mAP"]["average"],
        })
    if predictions and "pred_saliency_scores" in predictions[0]:
        hl = highlight_detection({p["qid"]: p["pred_saliency_scores"] for p in predictions}, annotations)
        metrics.update(hl)
        for name, values in hl.items():
            brief[f"{name}-mAP"] = values["HL-mAP"]
            brief[f"{name}-Hit1"] = values["HL-Hit1"]
    metrics["brief"] = {key: brief[key] for key in BRIEF_KEYS if key in brief}
    return metrics


def score_file(predictions: str | Path, annotations: str | Path) -> dict[str, Any]:
    """Score a submission file against the annotation file."""
    anns = load_annotations(annotations)
    return evaluate(read_predictions(predictions, anns), anns)


def windows_to_saliency(windows: Sequence[Sequence[float]], duration: float) -> list[float]:
    """Clip scores `[duration // 2]` from predicted windows: 1 where a clip's centre lies in a window, else 0."""
    n_clips = int(duration / CLIP_SECONDS)
    centres = np.arange(n_clips) * CLIP_SECONDS + CLIP_SECONDS / 2
    scores = np.zeros(n_clips)
    for start, end, *_ in windows:
        scores[(centres >= start) & (centres <= end)] = 1.0
    return scores.tolist()


def predictions_from_generations(samples: Sequence[Sample], completions: Sequence[str]) -> list[dict[str, Any]]:
    """Submission records from model text: parsed windows in answer order (scores descending by rank) and
    clip saliency derived from them (a generative model states moments, not per-clip scores)."""
    preds = []
    for sample, text in zip(samples, completions):
        ref = sample.reference
        intervals = [(s, e) if s <= e else (e, s) for s, e in parse_intervals_lazily(text)]
        windows = [[s, e, float(len(intervals) - k)] for k, (s, e) in enumerate(intervals)]
        preds.append({
            "qid": ref["qid"],
            "pred_relevant_windows": windows,
            # no stated moment -> no clip scores (a HIT@1 miss rather than credit for clip 0 of an all-zero list)
            "pred_saliency_scores": windows_to_saliency(windows, ref["duration"]) if windows else [],
        })
    return preds


def annotations_from_samples(samples: Sequence[Sample]) -> list[dict[str, Any]]:
    """The annotation records carried in the samples' references."""
    return [dict(sample.reference) for sample in samples]


PROMPT = (
    "The video is {duration:g} seconds long. Find every moment that matches the query: \"{query}\". "
    "Answer with the start and end time in seconds of each moment, most relevant first, "
    "one per line as \"start - end\"."
)


class QVHighlightsSource(TaskSource):
    """QVHighlights queries as eval tasks; `reference` is the annotation record the scorer reads.

    annotations: the benchmark's JSON Lines file. video_dir: folder of `<vid>.mp4` (any of the usual extensions);
    samples whose video is missing are skipped and counted in `skipped`. With `video_dir=None` no file is checked
    and the video part has no path (annotation-only use, e.g. scoring or text renditions).
    """

    name = "qvhighlights"

    def __init__(self, annotations: str | Path, video_dir: str | Path | None = None, fps: float = 1.0,
                 limit: int | None = None, domain: str = "video", reward: str | None = None) -> None:
        self.skipped = SkipLog()
        self.samples: list[Sample] = []
        video_root = Path(video_dir) if video_dir is not None else None
        for ann in load_annotations(annotations):
            if limit is not None and len(self.samples) >= limit:
                break
            sample_id = f"qvhighlights/{ann['qid']}"
            path = None
            if video_root is not None:
                found = find_video(video_root, ann["vid"])
                if found is None:
                    self.skipped.add("video missing", sample_id)
                    continue
                path = str(found)
            text = PROMPT.format(duration=float(ann["duration"]), query=ann["query"])
            content = [{"type": "video", "video": VideoPart(path=path, fps=fps)}, {"type": "text", "text": text}]
            reference = {k: ann[k] for k in ("qid", "duration", "relevant_windows", "relevant_clip_ids",
                                             "saliency_scores") if k in ann}
            self.samples.append(Sample(
                id=sample_id, domain=domain, messages=[{"role": "user", "content": content}],
                reference=reference, reward=reward,
                metadata={"benchmark": "qvhighlights", "qid": ann["qid"], "vid": ann["vid"],
                          "duration": ann["duration"], "num_windows": len(ann["relevant_windows"])},
            ))

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def __len__(self) -> int:
        return len(self.samples)


@register_task_source("qvhighlights")
def qvhighlights_source(**kwargs: Any) -> QVHighlightsSource:
    """YAML: `{source: qvhighlights, annotations: PATH, video_dir: PATH, fps: 1, limit: N}`."""
    return QVHighlightsSource(**kwargs)
