"""Temporal grounding: parse time intervals from free text and score them by temporal IoU.

Accepted interval forms (times are seconds `12.5`, optionally with a unit `12.5s` / `12.5 seconds`, or clock
times `00:12`, `0:01:05.5`): `[12.5, 30]`, `(12.5, 30)`, `12.5-30s`, `12.5 - 30 seconds`, `12.5 to 30`,
`from 00:12 to 00:30`, `between 12 and 30`, `start: 12.5, end: 30` (also as JSON keys). Several intervals in one
text are returned in the order written. An interval written backwards (`30 - 12.5`) is swapped back to
`(12.5, 30)`: the model named the right span, only in the wrong order.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from rewards.errors import InvalidAnswer
from rewards.registry import register_reward
from rewards.text import answer_region

Interval = tuple[float, float]

_TIME = r"(?<![\w.:])(?:\d+:\d{1,2}(?::\d{1,2})?(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
_UNIT = r"(?:\s*(?:seconds?|secs?|s)\b)?"
_DASH = r"(?:-|\u2013|\u2014|~)"
_INTERVAL = re.compile(
    rf"[\[(]\s*(?P<b1>{_TIME}){_UNIT}\s*(?:,|{_DASH}|\bto\b)\s*(?P<b2>{_TIME}){_UNIT}\s*[\])]"
    rf"|\bbetween\s+(?P<w1>{_TIME}){_UNIT}\s+and\s+(?P<w2>{_TIME}){_UNIT}"
    rf"|\bstart(?:[ _]?time)?\W{{0,3}}\s*[:=]\s*(?P<k1>{_TIME}){_UNIT}[^\d]{{0,20}}?\bend(?:[ _]?time)?\W{{0,3}}\s*[:=]\s*"
    rf"(?P<k2>{_TIME}){_UNIT}"
    rf"|(?P<p1>{_TIME}){_UNIT}\s*(?:{_DASH}|\bto\b|\buntil\b|\btill\b)\s*(?P<p2>{_TIME}){_UNIT}",
    re.IGNORECASE,
)


def to_seconds(token: str) -> float:
    """`"12.5"` -> 12.5, `"01:05"` -> 65, `"0:01:05.5"` -> 65.5."""
    parts = token.split(":")
    seconds = 0.0
    for part in parts:
        seconds = seconds * 60 + float(part)
    return seconds


def find_intervals(text: str) -> list[tuple[Interval, tuple[int, int]]]:
    """Every interval in `text` with its character span `(start, end)`, in the order written."""
    found = []
    for match in _INTERVAL.finditer(text):
        groups = [g for g in match.groups() if g is not None]
        start, end = to_seconds(groups[0]), to_seconds(groups[1])
        if start > end:
            start, end = end, start
        found.append(((start, end), match.span()))
    return found


def parse_intervals(text: str) -> list[Interval]:
    """Intervals in seconds `(start, end)` with `start <= end`, in the order written (empty list if none)."""
    return [interval for interval, _ in find_intervals(text)]


def clip_interval(interval: Sequence[float], duration: float | None) -> Interval:
    """`interval` clipped to `[0, duration]` (only the lower bound 0 when `duration` is None)."""
    start, end = float(interval[0]), float(interval[1])
    if start > end:
        start, end = end, start
    upper = float("inf") if duration is None else float(duration)
    return min(max(start, 0.0), upper), min(max(end, 0.0), upper)


def temporal_iou(pred: Sequence[float], truth: Sequence[float], duration: float | None = None) -> float:
    """IoU of two `(start, end)` intervals, after clipping both to `[0, duration]` (to `[0, inf)` when
    `duration` is None: negative times never exist).

    Zero-length intervals: two identical points score 1.0, a point inside or outside a span scores 0.0 (its
    intersection has no length)."""
    s1, e1 = clip_interval(pred, duration)
    s2, e2 = clip_interval(truth, duration)
    inter = max(0.0, min(e1, e2) - max(s1, s2))
    union = (e1 - s1) + (e2 - s2) - inter
    if union <= 0.0:
        return float(s1 == s2 and e1 == e2)
    return inter / union


def reference_windows(reference: Any) -> list[Interval]:
    """Ground-truth windows from `[s, e]`, `[[s, e], ...]`, or a dict with key `window`/`windows`/`interval`/
    `relevant_windows`/`timestamp`/`segment`; ValueError naming the value when it is none of these."""
    if isinstance(reference, dict):
        for key in ("windows", "relevant_windows", "window", "interval", "timestamp", "segment"):
            if key in reference:
                return reference_windows(reference[key])
        raise ValueError(f"reference dict {reference!r:.80} has no window/interval key")
    if isinstance(reference, str):
        windows = parse_intervals(reference)
        if not windows:
            raise ValueError(f"reference {reference!r:.80} holds no interval")
        return windows
    if isinstance(reference, (list, tuple, np.ndarray)) and len(reference) == 2 and all(
        isinstance(x, numbers.Real) for x in reference
    ):
        return [(float(reference[0]), float(reference[1]))]
    if isinstance(reference, (list, tuple, np.ndarray)) and len(reference) and all(
        isinstance(w, (list, tuple, np.ndarray)) and len(w) >= 2 for w in reference
    ):
        return [(float(w[0]), float(w[1])) for w in reference]
    raise ValueError(f"reference {reference!r:.80} is not an interval [s, e] or a list of them")


@register_reward("temporal_iou", "IoU of the first predicted interval with the reference [s, e] (max over GT windows)")
def temporal_iou_reward(completion: str, reference: Any, duration: float | None = None, **meta: Any) -> float:
    """IoU of the first interval in the answer with the reference window (the best one when the reference lists
    several, as QVHighlights does); bounds clipped to `[0, duration]` when metadata gives `duration`."""
    predicted = parse_intervals(answer_region(completion))
    if not predicted:
        raise InvalidAnswer("no interval found")
    return max(temporal_iou(predicted[0], window, duration) for window in reference_windows(reference))


def max_weight_matching(weights: np.ndarray) -> list[tuple[int, int]]:
    """Row/column pairs maximising the summed weight (Hungarian algorithm with potentials, O(n^3)).

    weights: `[R, C]`, any sign. Returns min(R, C) pairs `(row, col)`."""
    weights = np.asarray(weights, dtype=np.float64)
    rows, cols = weights.shape
    if rows == 0 or cols == 0:
        return []
    n = max(rows, cols)
    cost = np.zeros((n, n))
    cost[:rows, :cols] = weights.max() - weights  # maximise weight == minimise cost; padding costs the same
    inf = float("inf")
    u, v = np.zeros(n + 1), np.zeros(n + 1)
    match = np.zeros(n + 1, dtype=int)  # match[col] = row (1-based), 0 = free
    way = np.zeros(n + 1, dtype=int)
    for row in range(1, n + 1):
        match[0] = row
        col0 = 0
        minv = np.full(n + 1, inf)
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[col0] = True
            row0 = match[col0]
            delta, col1 = inf, 0
            for col in range(1, n + 1):
                if not used[col]:
                    reduced = cost[row0 - 1, col - 1] - u[row0] - v[col]
                    if reduced < minv[col]:
                        minv[col], way[col] = reduced, col0
                    if minv[col] < delta:
                        delta, col1 = minv[col], col
            for col in range(n + 1):
                if used[col]:
                    u[match[col]] += delta
                    v[col] -= delta
                else:
                    minv[col] -= delta
            col0 = col1
            if match[col0] == 0:
                break
        while col0:
            col1 = way[col0]
            match[col0] = match[col1]
            col0 = col1
    return sorted((match[c] - 1, c - 1) for c in range(1, n + 1) if match[c] - 1 < rows and c - 1 < cols)


def mean_matched_iou(
    predicted: Sequence[Sequence[float]], truth: Sequence[Sequence[float]], duration: float | None = None
) -> float:
    """Hungarian (optimal one-to-one) matching of predicted to reference segments by IoU; the summed matched IoU
    divided by max(#pred, #ref), so missed and surplus segments both cost."""
    if not predicted or not truth:
        return 0.0
    ious = np.array([[temporal_iou(p, t, duration) for t in truth] for p in predicted])
    pairs = max_weight_matching(ious)
    return float(sum(ious[r, c] for r, c in pairs) / max(len(predicted), len(truth)))


@register_reward("mean_iou", "Hungarian-matched IoU over several predicted vs reference segments / max(#pred, #ref)")
def mean_iou_reward(completion: str, reference: Any, duration: float | None = None, **meta: Any) -> float:
    predicted = parse_intervals(answer_region(completion))
    if not predicted:
        raise InvalidAnswer("no interval found")
    return mean_matched_iou(predicted, reference_windows(reference), duration)


def grounding_metrics(ious: Sequence[float], thresholds: Sequence[float] = (0.3, 0.5, 0.7)) -> dict[str, float]:
    """`{"R1@0.3", "R1@0.5", "R1@0.7", "mIoU"}` in PERCENT (0-100, as grounding papers report them).

    A query is a hit at threshold t when its top-1 IoU >= t. ious: `[N]`, one top-1 IoU per query (an
    unparsable answer counts as IoU 0)."""
    values = np.asarray(list(ious), dtype=np.float64)
    if values.size == 0:
        raise ValueError("grounding_metrics needs at least one IoU")
    if not np.all(np.isfinite(values)) or values.min() < 0 or values.max() > 1:
        raise ValueError("IoUs must be finite and within [0, 1]")
    metrics = {f"R1@{t:g}": float(100.0 * np.mean(values >= t)) for t in thresholds}
    metrics["mIoU"] = float(100.0 * values.mean())
    return metrics
