"""Dense video captioning: timestamped event captions scored against reference events.

A prediction is free text where each event is an interval followed by its caption, one event per line or
run together: `[0.0, 4.0] a red square appears` / `0-4s: a red square appears`. The caption of an event is the
text between its interval and the next interval (separators such as `:` `-` `,` trimmed).

Score = mean over REFERENCE events of max over predicted events of (temporal IoU x caption token F1). Averaging
over the reference penalises missed events; the product means an event only counts when both its time and its
words are right; surplus predictions cost nothing directly but cannot raise the score (keep the output short).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rewards.errors import InvalidAnswer
from rewards.registry import register_reward
from rewards.temporal import find_intervals, reference_windows, temporal_iou
from rewards.text import answer_region, token_f1

_SEPARATORS = " \t\r\n:;,.-\u2013\u2014|*>"


@dataclass(frozen=True)
class Event:
    start: float
    end: float
    caption: str


def parse_events(text: str) -> list[Event]:
    """Events (interval + following caption) in the order written; events with an empty caption are kept (they
    still score 0 on text) so that a bare list of intervals is not mistaken for no answer."""
    found = find_intervals(text)
    events = []
    for k, ((start, end), (_, span_end)) in enumerate(found):
        next_start = found[k + 1][1][0] if k + 1 < len(found) else len(text)
        caption = text[span_end:next_start].strip(_SEPARATORS)
        events.append(Event(start, end, caption))
    return events


def reference_events(reference: Any) -> list[Event]:
    """Reference events from a list of `{"start", "end", "caption"}` / `{"timestamp": [s, e], "sentence"}` dicts,
    `[[s, e, caption], ...]`, a dict `{"events": [...]}` or `{"timestamps": [...], "sentences": [...]}`
    (ActivityNet Captions layout), or event text in the prediction format."""
    if isinstance(reference, str):
        return parse_events(reference)
    if isinstance(reference, dict):
        if "events" in reference:
            return reference_events(reference["events"])
        if "timestamps" in reference and "sentences" in reference:
            return [Event(float(s), float(e), str(c)) for (s, e), c in zip(reference["timestamps"], reference["sentences"])]
        raise ValueError(f"reference dict {reference!r:.80} has neither 'events' nor 'timestamps'+'sentences'")
    events = []
    for item in reference or []:
        if isinstance(item, dict):
            caption = item.get("caption", item.get("sentence", item.get("text")))
            if "start" in item and "end" in item:
                start, end = float(item["start"]), float(item["end"])
            else:
                (start, end), = reference_windows(item)
            events.append(Event(min(start, end), max(start, end), str(caption or "")))
        elif isinstance(item, (list, tuple)) and len(item) == 3:
            start, end = float(item[0]), float(item[1])
            events.append(Event(min(start, end), max(start, end), str(item[2])))
        else:
            raise ValueError(f"reference event {item!r:.80} is not a dict or [start, end, caption]")
    return events


def dense_caption_score(predicted: list[Event], reference: list[Event], duration: float | None = None) -> float:
    """Mean over reference events of the best `IoU x token F1` among predicted events (0 with no predictions)."""
    if not reference:
        raise ValueError("dense captioning reference has no events")
    if not predicted:
        return 0.0
    total = 0.0
    for ref in reference:
        total += max(
            temporal_iou((p.start, p.end), (ref.start, ref.end), duration) * token_f1(p.caption, ref.caption)
            for p in predicted
        )
    return total / len(reference)


@register_reward("dense_caption", "mean over reference events of best (temporal IoU x caption token F1)")
def dense_caption_reward(completion: str, reference: Any, duration: float | None = None, **meta: Any) -> float:
    predicted = parse_events(answer_region(completion))
    if not predicted:
        raise InvalidAnswer("no timestamped event found")
    return dense_caption_score(predicted, reference_events(reference), duration)
