"""The one reward-input builder: what every reward sees of a sample, in training and evaluation alike.

`reward_requests(samples, completions, completion_ids)` turns task samples (`tasks.base.Sample`) and their
decoded answers into the scorer's request dicts. From a request each signature gets its own convention
(`rewards.registry.FunctionReward`):

- native `fn(completion, reference, **meta)`: the sample's metadata (plus `domain`), `prompt` as text;
- TRL `fn(prompts, completions, completion_ids, trainer_state, **columns)`: TRL's calling convention in full. A
  conversational task (a chat prompt: every task sample) gets `prompts` as message lists and `completions` as
  `[{"role": "assistant", "content": text}]`; a plain-text request gets strings. `columns` are every task
  field (`id`, `domain`, `reference`, `reward`, `target`, `tools`), every metadata key, and the reference under
  TRL's and verl's names (`solution`, `ground_truth`) unless metadata has its own;
- verl `compute_score(data_source, solution_str, ground_truth, extra_info)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Task fields passed to TRL-style rewards as columns (the prompt and completion travel on their own).
TASK_FIELDS = ("id", "domain", "reference", "reward", "target", "tools")


@dataclass(frozen=True)
class RewardTrainerState:
    """What TRL rewards read from `trainer_state` (a subset of transformers' TrainerState, picklable):
    `global_step` (the step whose rollouts are scored; in evaluation, the evaluated checkpoint's) and
    `max_steps` (the run's `trainer.steps`)."""

    global_step: int = 0
    max_steps: int = 0


def reward_requests(samples: Sequence[Any], completions: Sequence[str],
                    completion_ids: Sequence[Sequence[int]] | None = None) -> list[dict[str, Any]]:
    """One scorer request per (sample, completion)."""
    from tasks.base import prompt_messages, prompt_text  # the rewards package itself never needs tasks

    if len(samples) != len(completions):
        raise ValueError(f"{len(samples)} samples but {len(completions)} completions")
    requests = []
    for i, (sample, completion) in enumerate(zip(samples, completions)):
        fields = {name: getattr(sample, name, None) for name in TASK_FIELDS}
        requests.append({
            "id": sample.id, "domain": sample.domain, "prompt": prompt_text(sample),
            "messages": prompt_messages(sample), "completion": completion,
            "completion_ids": list(completion_ids[i]) if completion_ids is not None else None,
            "reference": sample.reference, "metadata": sample.metadata, "reward": sample.reward, "fields": fields,
        })
    return requests


def trl_columns(references: Sequence[Any], metas: Sequence[dict], extras: Sequence[dict]) -> dict[str, list]:
    """TRL's per-sample columns (lists over the batch; None where a sample lacks a key)."""
    columns: dict[str, list] = {}
    field_rows = [e.get("fields") or {} for e in extras]
    for key in dict.fromkeys(k for row in field_rows for k in row):
        columns[key] = [row.get(key) for row in field_rows]
    for key in dict.fromkeys(k for meta in metas for k in meta):
        columns[key] = [meta.get(key) for meta in metas]
    references = list(references)
    columns["reference"] = references
    for alias in ("ground_truth", "solution"):
        if alias not in columns:
            columns[alias] = references
    return columns


def trl_prompts_and_completions(prompts: Sequence[str], completions: Sequence[str],
                                extras: Sequence[dict]) -> tuple[list, list]:
    """TRL's `prompts` / `completions`: messages when every request of the batch is conversational."""
    conversational = bool(extras) and all(e.get("messages") is not None for e in extras)
    if not conversational:
        return list(prompts), list(completions)
    return ([e["messages"] for e in extras],
            [[{"role": "assistant", "content": c}] for c in completions])
