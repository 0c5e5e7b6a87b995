"""`eval CHECKPOINT|RUN_DIR`: score checkpoints on held-out tasks (the run's own, or a benchmark adapter),
with the same reward functions (or the benchmark's official scorer) as everywhere else, through the trainer's
own evaluator (`rl.evaluation`: video decoding, sampling settings and reward inputs included)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from models.chat import ChatRenderer
from models.factory import load_model, load_tokenizer, vision_layout
from rewards.scorer import RewardScorer
from rl.checkpoint import STEP_DIR, list_checkpoints
from rl.config import JobConfig, TaskConfig, load_config
from rl.data import load_tasks
from rl.evaluation import eval_settings, evaluate_samples, generate_completions, prepare_eval_samples


def _find_config(path: Path, explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    for candidate in (path / "config.yaml", path.parent.parent / "config.yaml"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"no config.yaml beside {path}: pass --config")


def _is_run_dir(path: Path) -> bool:
    return (path / "checkpoints").is_dir()


def run_eval(args: argparse.Namespace) -> int:
    path = Path(args.path).resolve()  # `final` is a link into checkpoints/
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    config_path = _find_config(path, args.config)
    cfg, _ = load_config(config_path)
    evaluator = CheckpointEvaluator(cfg, args)
    if _is_run_dir(path):
        from evals.watch import cadence_steps, run_finished, watch

        t = cfg.trainer
        expected = cadence_steps(t.checkpoint_every, t.eval_every, t.steps)
        if args.watch:  # until the run ends (`final` at its last step) and everything is scored; Ctrl-C stops it

            def finished() -> bool:
                steps = load_config(config_path)[0].trainer.steps if config_path.exists() else t.steps
                return run_finished(path, steps)  # a resumed run may have raised trainer.steps

            watch(path, evaluator, poll_s=args.poll, results_dir=evaluator.results_dir, finished=finished,
                  expected_steps=expected)
            return 0
        watch(path, evaluator, poll_s=0, max_idle_s=0, results_dir=evaluator.results_dir, expected_steps=expected)
        from evals.retention import format_retention, retention_report

        rows = retention_report(path, results_dir=evaluator.results_dir)
        print(format_retention(rows))
        return 0
    result = evaluator(path)
    out = Path(args.out) if args.out else path / f"{evaluator.results_dir}.json"
    out.write_text(json.dumps(result, indent=2))
    print(format_report(result))
    print(f"wrote {out}")
    return 0


class CheckpointEvaluator:
    """`evaluator(checkpoint_dir) -> result dict` (the watch loop's callback)."""

    def __init__(self, cfg: JobConfig, args: argparse.Namespace):
        self.cfg = cfg
        self.benchmark = args.benchmark
        self.results_dir = f"eval_{args.benchmark}" if args.benchmark else "eval"
        if args.benchmark:
            task_args: dict[str, Any] = {}
            for item in args.arg:
                key, sep, raw = item.partition("=")
                if not sep:
                    raise ValueError(f"--arg {item!r} must look like KEY=VALUE")
                task_args[key] = yaml.safe_load(raw)
            if args.annotations:
                task_args["annotations"] = args.annotations
            if args.video_dir:
                task_args["video_dir"] = args.video_dir
            if args.limit:
                task_args["limit"] = args.limit
            self.task_args = task_args
            self.samples = None  # built per checkpoint (NIAH fits lengths with the model's tokenizer)
        else:
            self.samples = load_tasks(cfg.data.eval, cfg.run.seed)
            if args.tasks:
                keep = set(args.tasks.split(","))
                self.samples = [s for s in self.samples if s.domain in keep]
            if args.limit:
                self.samples = self.samples[: args.limit]
        self._decoded: dict[Any, list] = {}  # held-out samples decoded per vision layout (same for a run's checkpoints)

    def _eval_samples(self, layout) -> list:
        key = None if layout is None else (layout.patch_size, layout.merge_size)
        if key not in self._decoded:
            self._decoded[key] = prepare_eval_samples(self.samples, self.cfg.data, layout)
        return self._decoded[key]

    def __call__(self, checkpoint: Path) -> dict[str, Any]:
        checkpoint = Path(checkpoint)
        from rl.policy import resolve_device

        # where the job trains (`trainer.device`, 'auto': CUDA when there is one): a large student is not
        # evaluated on the CPU
        model = load_model(checkpoint).to(resolve_device(self.cfg.trainer.device)).eval()
        tokenizer = load_tokenizer(checkpoint)
        layout = vision_layout(model)
        renderer = ChatRenderer(tokenizer, layout, self.cfg.model.template_kwargs)
        match = STEP_DIR.match(checkpoint.name)
        step = int(match.group(1)) if match else -1
        if self.benchmark:
            from evals.score import score_generations

            args = dict(self.task_args)
            if self.benchmark == "niah":
                args["tokenizer"] = tokenizer
            samples = load_tasks([TaskConfig(source=self.benchmark, args=args)], self.cfg.run.seed)
            samples = prepare_eval_samples(samples, self.cfg.data, layout)
            completions = generate_completions(model, renderer, samples, eval_settings(self.cfg, renderer),
                                               self.cfg.eval.batch_size)
            metrics = score_generations(self.benchmark, samples, completions)
            return {"step": step, "checkpoint": str(checkpoint), "benchmark": self.benchmark, "metrics": metrics,
                    "examples": [{"id": s.id, "completion": c} for s, c in list(zip(samples, completions))[:5]]}
        samples = self._eval_samples(layout)
        with RewardScorer.from_config(self.cfg.rewards) as scorer:
            report = evaluate_samples(self.cfg, model, renderer, samples, scorer, step)
        return {"step": step, "checkpoint": str(checkpoint), "domains": report}


def format_report(result: dict[str, Any]) -> str:
    if "domains" in result:
        lines = [f"{'domain':<12} {'mean reward':>12} {'n':>6} {'invalid':>8}"]
        for domain, entry in result["domains"].items():
            lines.append(f"{domain:<12} {entry['mean_reward']:>12.3f} {entry['n']:>6} {entry['invalid']:>8}")
        return "\n".join(lines)
    from evals.score import format_table

    return format_table(result["metrics"])


__all__ = ["run_eval", "CheckpointEvaluator", "list_checkpoints"]
