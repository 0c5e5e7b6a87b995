"""Held-out evaluation: generate with a model (student or teacher, in its own view), score with the same
rewards as training, and report per domain (with length / depth / task breakdowns and grounding metrics)."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from models.chat import ChatRenderer
from rollout.base import SamplingSettings
from rollout.hf_engine import HFEngine
from tasks.base import Sample
from teachers.views import view_messages

BREAKDOWN_KEYS = ("task", "length", "depth")
# Needle depth is continuous (position / (lines - 1)): reported in quarter bins, RULER-style, not per value.
DEPTH_BINS = 4


def breakdown_label(key: str, value: Any) -> str:
    """The breakdown row a sample's metadata value falls in (`depth` binned to 0, 0.25, ..., 1)."""
    if key == "depth":
        return f"{round(float(value) * DEPTH_BINS) / DEPTH_BINS:.2f}"
    return str(value)


@torch.no_grad()
def generate_completions(
    model, renderer: ChatRenderer, samples: list[Sample], settings: SamplingSettings, batch_size: int,
    view: str = "native", generate: Callable | None = None,
) -> list[str]:
    """Answers to `samples` (rendered in `view`), decoded without special tokens: from `model` where it is (an hf
    engine around it, on its own device), or from `generate(prompts, settings) -> Generations` (the trainer's
    evaluation engine, which holds the student's synced weights)."""
    settings = dataclasses.replace(settings, suppress_token_ids=renderer.placeholder_ids)
    prompts = [renderer.render(view_messages(s, view), s.tools) for s in samples]
    if generate is None:
        engine = HFEngine(model=model, batch_size=batch_size, device=next(model.parameters()).device)
        was_training = model.training
        gens = engine.generate(prompts, settings)
        model.train(was_training)
    else:
        gens = generate(prompts, settings)
    return [renderer.decode_response(ids) for ids in gens.response_ids]


def score_completions(samples: list[Sample], completions: list[str], scorer, routes: dict[str, Any]) -> dict[str, Any]:
    """Per-domain report: mean reward, count, invalid count, breakdowns, and R1@t / mIoU for IoU rewards."""
    result = scorer.score(
        [
            {"id": s.id, "domain": s.domain, "prompt": "", "completion": c, "reference": s.reference,
             "metadata": s.metadata, "reward": s.reward}
            for s, c in zip(samples, completions)
        ]
    )
    by_domain: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        by_domain[s.domain].append(i)
    report: dict[str, Any] = {}
    for domain, idx in sorted(by_domain.items()):
        values = [float(result.rewards[i]) for i in idx]
        entry: dict[str, Any] = {
            "mean_reward": sum(values) / len(values),
            "n": len(values),
            "invalid": int(sum(bool(result.invalid[i]) for i in idx)),
        }
        breakdown: dict[str, dict[str, float]] = {}
        for key in BREAKDOWN_KEYS:
            groups: dict[str, list[float]] = defaultdict(list)
            for i in idx:
                if key in samples[i].metadata:
                    groups[breakdown_label(key, samples[i].metadata[key])].append(float(result.rewards[i]))
            if len(groups) > 1:
                breakdown[key] = {k: sum(v) / len(v) for k, v in sorted(groups.items(), key=lambda kv: _sort_key(kv[0]))}
        if breakdown:
            entry["breakdown"] = breakdown
        ious = [float(result.rewards[i]) for i in idx if (samples[i].reward or routes.get(domain)) == "temporal_iou"]
        if ious:  # R1@0.3/0.5/0.7 and mIoU over the samples scored by temporal IoU
            from rewards.temporal import grounding_metrics

            entry["grounding"] = {**grounding_metrics(ious), "n": len(ious)}
        report[domain] = entry
    return report


def _sort_key(label: str) -> tuple:
    try:
        return (0, float(label), "")
    except ValueError:
        return (1, 0.0, label)


def evaluate_model(model, renderer, samples, scorer, routes, settings, batch_size, view="native",
                   generate: Callable | None = None) -> dict[str, Any]:
    completions = generate_completions(model, renderer, samples, settings, batch_size, view, generate)
    return score_completions(samples, completions, scorer, routes)
