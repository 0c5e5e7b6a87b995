"""Held-out evaluation: generate with a model (student or teacher, in its own view), score with the same
rewards as training, and report per domain (with length / depth / task breakdowns and grounding metrics).

The one evaluator: the trainer's in-loop evaluation and `vlpost eval` both call `prepare_eval_samples` (video
decoding, with the job's `data.video_*` settings and the model's vision layout) and `evaluate_samples`
(sampling settings, reward inputs and trainer state built the same way), so a checkpoint scores the same in both.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from models.chat import ChatRenderer
from rewards.inputs import RewardTrainerState, reward_requests
from rollout.base import SamplingSettings
from rollout.hf_engine import HFEngine
from tasks.base import Sample
from tasks.prefetch import decode_samples
from teachers.views import view_messages


class EvalSetError(RuntimeError):
    """A held-out set that cannot be evaluated (every sample's video unusable): an error, not an empty table."""


def video_options(data_cfg: Any, layout: Any) -> dict[str, Any]:
    """Decoding settings of `data.video_*` for a model's vision layout (frame sides a multiple of its
    patch * merge): what training batches and held-out sets are decoded with."""
    size = tuple(data_cfg.video_size) if isinstance(data_cfg.video_size, list) else (data_cfg.video_size or (32, 32))
    multiple = layout.patch_size * layout.merge_size if layout else 32
    return dict(fps=data_cfg.video_fps, max_frames=data_cfg.video_max_frames, size=size, multiple=multiple)


def prepare_eval_samples(samples: list[Sample], data_cfg: Any, layout: Any, log=print) -> list[Sample]:
    """Held-out samples with their videos decoded (file-backed sources: video_files, charades_sta, qvhighlights).
    Unusable videos are skipped and reported; a set left empty raises `EvalSetError`."""
    decoded, skipped = decode_samples(samples, workers=data_cfg.decode_workers, **video_options(data_cfg, layout))
    if skipped:
        log(f"eval: skipped {len(skipped)} of {len(samples)} samples with unusable videos, e.g. {skipped[:3]}")
    if samples and not decoded:
        raise EvalSetError(f"no held-out sample is usable: all {len(samples)} videos failed to decode "
                           f"(e.g. {skipped[0][0]!r}: {skipped[0][1]}); is the video folder right?")
    return decoded


def eval_settings(cfg: Any, renderer: ChatRenderer) -> SamplingSettings:
    """Sampling in evaluation: `eval.*` (greedy by default; else at `rollout.temperature`), placeholders barred."""
    return SamplingSettings(
        max_new_tokens=cfg.eval.max_new_tokens, temperature=cfg.rollout.temperature, greedy=cfg.eval.greedy,
        seed=cfg.run.seed, suppress_token_ids=renderer.placeholder_ids,
    )


def evaluate_samples(cfg: Any, model, renderer: ChatRenderer, samples: list[Sample], scorer, step: int,
                     view: str = "native", engine: Callable | None = None) -> dict[str, Any]:
    """The per-domain report of `model` (or of `engine`, see `generate`) on decoded `samples` at `step` (the
    trainer's and `vlpost eval`'s)."""
    completions, ids = generate(model, renderer, samples, eval_settings(cfg, renderer), cfg.eval.batch_size, view,
                                engine)
    state = RewardTrainerState(global_step=max(step, 0), max_steps=cfg.trainer.steps)
    return score_completions(samples, completions, scorer, cfg.rewards.routes, completion_ids=ids,
                             trainer_state=state)

BREAKDOWN_KEYS = ("task", "length", "depth")
# Needle depth is continuous (position / (lines - 1)): reported in quarter bins, RULER-style, not per value.
DEPTH_BINS = 4


def breakdown_label(key: str, value: Any) -> str:
    """The breakdown row a sample's metadata value falls in (`depth` binned to 0, 0.25, ..., 1)."""
    if key == "depth":
        return f"{round(float(value) * DEPTH_BINS) / DEPTH_BINS:.2f}"
    return str(value)


@torch.no_grad()
def generate(
    model, renderer: ChatRenderer, samples: list[Sample], settings: SamplingSettings, batch_size: int,
    view: str = "native", engine: Callable | None = None,
) -> tuple[list[str], list[list[int]]]:
    """Answers to `samples` (rendered in `view`): decoded without special tokens, and their token ids. From
    `model` where it is (an hf engine around it, on the model's own device), or from `engine(prompts, settings) ->
    Generations` (the trainer's evaluation engine, which holds the student's synced weights)."""
    settings = dataclasses.replace(settings, suppress_token_ids=renderer.placeholder_ids)
    prompts = [renderer.render(view_messages(s, view), s.tools) for s in samples]
    if engine is None:
        was_training = model.training
        gens = HFEngine(model=model, batch_size=batch_size, device=next(model.parameters()).device).generate(
            prompts, settings)
        model.train(was_training)
    else:
        gens = engine(prompts, settings)
    return [renderer.decode_response(ids) for ids in gens.response_ids], [list(ids) for ids in gens.response_ids]


def generate_completions(
    model, renderer: ChatRenderer, samples: list[Sample], settings: SamplingSettings, batch_size: int, view: str = "native"
) -> list[str]:
    """Model answers to `samples` (rendered in `view`), decoded without special tokens."""
    return generate(model, renderer, samples, settings, batch_size, view)[0]


def score_completions(samples: list[Sample], completions: list[str], scorer, routes: dict[str, Any],
                      completion_ids: list[list[int]] | None = None, trainer_state: Any = None) -> dict[str, Any]:
    """Per-domain report: mean reward, count, invalid count, breakdowns, and R1@t / mIoU for IoU rewards. Rewards
    get the same inputs as in training (`rewards.inputs.reward_requests`: the prompt included)."""
    result = scorer.score(reward_requests(samples, completions, completion_ids), trainer_state=trainer_state)
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
                   trainer_state: Any = None) -> dict[str, Any]:
    completions, ids = generate(model, renderer, samples, settings, batch_size, view)
    return score_completions(samples, completions, scorer, routes, completion_ids=ids, trainer_state=trainer_state)
