"""Off-policy fine-tuning's data: each domain teacher answers training prompts, the domain reward scores the
answers, and the good ones become demonstrations (a JSONL file read by the `demonstrations` task source)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from rl.config import JobConfig
from tasks.base import Sample


def write_demonstrations(cfg: JobConfig, teacher: Path, samples: list[Sample], out: Path, view: str = "native",
                         min_reward: float = 1.0, temperature: float = 1.0, max_new_tokens: int = 40,
                         seed: int = 0, keep_truncated: bool = False) -> dict[str, Any]:
    """Sample one answer per prompt from `teacher` (in its `view`), keep those whose reward is >= `min_reward`
    and that ended (not truncated, unless `keep_truncated`), write `{id, target, reward}` lines to `out`. Returns counts; an existing
    `out` (with its `.json` stats beside it) is kept: the step is cached."""
    stats_path = out.with_suffix(".json")
    if out.exists() and stats_path.exists():
        return json.loads(stats_path.read_text())
    from models.chat import ChatRenderer
    from models.factory import load_model, load_tokenizer, vision_layout
    from rewards.inputs import reward_requests
    from rewards.scorer import RewardScorer
    from rl.evaluation import generate, prepare_eval_samples
    from rollout.base import SamplingSettings

    device = torch.device("cuda" if torch.cuda.is_available() and cfg.trainer.device != "cpu" else "cpu")
    model = load_model(teacher).to(device).eval()
    layout = vision_layout(model)
    renderer = ChatRenderer(load_tokenizer(teacher), layout, cfg.model.template_kwargs)
    samples = prepare_eval_samples(samples, cfg.data, layout)
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature, greedy=temperature == 0,
                                seed=seed)
    completions, ids = generate(model, renderer, samples, settings, cfg.eval.batch_size, view)
    with RewardScorer.from_config(cfg.rewards) as scorer:
        rewards = scorer.score(reward_requests(samples, completions, ids)).rewards
    kept = [(s, c, float(r)) for s, c, i, r in zip(samples, completions, ids, rewards)
            if float(r) >= min_reward and i and (keep_truncated or i[-1] == renderer.eos_id)]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps({"id": s.id, "target": c, "reward": r}) + "\n" for s, c, r in kept))
    tmp.replace(out)
    gen_tokens = sum(len(i) for i in ids)
    stats = {"prompts": len(samples), "kept": len(kept), "mean_reward": float(sum(rewards) / max(len(rewards), 1)),
             "generated_tokens": gen_tokens, "teacher": str(teacher)}
    stats_path.write_text(json.dumps(stats, indent=2))
    return stats
