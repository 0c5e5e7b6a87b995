"""Stand-alone held-out scoring of a model folder (the base student, the teachers, merged models, lambda
candidates) through the trainer's own evaluator (`rl.evaluation`), cached by the model's weights file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from rl.config import JobConfig
from tasks.base import Sample


def weights_stamp(model: Path) -> list:
    """What identifies a model folder's weights without reading them: each weights file's name, size, mtime."""
    model = Path(model).resolve()
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(model.glob("*.safetensors"))]


class FolderEvaluator:
    """`evaluator(label, model_folder, samples, view) -> {domain: mean reward}` with the eval job's settings
    (`eval.*`, `rewards.*`, `rollout.temperature`); results cached as `<cache>/<label>.json`."""

    def __init__(self, cfg: JobConfig, cache: Path, log=print):
        self.cfg, self.cache, self.log = cfg, Path(cache), log
        use_cuda = cfg.trainer.device == "cuda" or (cfg.trainer.device == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda" if use_cuda else "cpu")

    def __call__(self, label: str, model: str | Path, samples: list[Sample], view: str = "native") -> dict[str, float]:
        return {d: r["mean_reward"] for d, r in self.report(label, model, samples, view).items()}

    def report(self, label: str, model: str | Path, samples: list[Sample], view: str = "native") -> dict[str, Any]:
        path = self.cache / f"{label}.json"
        key = {"model": str(Path(model).resolve()), "weights": weights_stamp(Path(model)), "view": view,
               "samples": [s.id for s in samples]}
        if path.exists():
            cached = json.loads(path.read_text())
            if cached.get("key") == key:
                return cached["report"]
        report = self._evaluate(Path(model), samples, view)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"key": key, "report": report}, indent=2))
        tmp.replace(path)
        summary = ", ".join(f"{d} {r['mean_reward']:.3f}" for d, r in report.items())
        self.log(f"[compare] eval {label}: {summary}")
        return report

    def _evaluate(self, model_path: Path, samples: list[Sample], view: str) -> dict[str, Any]:
        from models.chat import ChatRenderer
        from models.factory import load_model, load_tokenizer, vision_layout
        from rewards.scorer import RewardScorer
        from rl.evaluation import evaluate_samples, prepare_eval_samples

        model = load_model(model_path).to(self.device).eval()
        layout = vision_layout(model)
        renderer = ChatRenderer(load_tokenizer(model_path), layout, self.cfg.model.template_kwargs)
        decoded = prepare_eval_samples(samples, self.cfg.data, layout, log=self.log)
        with RewardScorer.from_config(self.cfg.rewards) as scorer:
            return evaluate_samples(self.cfg, model, renderer, decoded, scorer, 0, view=view)
