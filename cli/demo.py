"""`demo`: the embedded-default pipeline end to end, each stage a `train` job; finished stages are skipped.

teachers (one SFT job per domain) -> weak base student (short SFT on the mix) -> MOPD -> final report
(student before / after beside each teacher, per domain) and the held-out reward plot.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from core.options import option

DEFAULT_PLAN = "configs/demo.yaml"


@dataclass
class DemoPlan:
    """A demo plan file: the job configs to run in order (a stage whose run has `final` is skipped)."""

    stages: list[str] = option("Job configs, run in order; the last one gets the command line's overrides.")


def is_plan(path: str | Path) -> bool:
    """A YAML whose top level has `stages` is a demo plan, not a job."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and "stages" in data


def load_plan(path: str | Path) -> list[str]:
    """The stages of a plan, validated like a job file (unknown keys, types, missing stage files are errors)."""
    from rl.config_loader import ConfigError, build_dataclass, load_yaml_tree

    data, provenance = load_yaml_tree(path)
    provenance.setdefault("", str(path))
    plan = build_dataclass(DemoPlan, data, provenance)
    if not plan.stages:
        raise ConfigError(f"{path}: 'stages' lists no configs")
    missing = [s for s in plan.stages if not Path(s).is_file()]
    if missing:
        raise ConfigError(f"{path}: stage config(s) not found (paths are relative to the working folder): {missing}")
    return plan.stages


def check_plan(path: str | Path, overrides: list[str], require_files: bool = False) -> tuple[list[str], list[str]]:
    """(problems, notes) of every stage, each prefixed by its file: what `check` prints for a plan."""
    from rl.config import load_config
    from rl.config_check import check_config

    problems, notes = [], []
    stages = load_plan(path)
    produced = set()
    for i, stage in enumerate(stages):
        cfg, _ = load_config(stage, overrides if i == len(stages) - 1 else [])
        stage_problems, stage_notes = check_config(cfg, require_files=require_files)
        problems += [f"{stage}: {p}" for p in stage_problems]
        # a later stage's model / teachers are earlier stages' outputs: not missing, just not built yet
        notes += [f"{stage}: {n}" for n in stage_notes if not any(out in n for out in produced)]
        produced.add(str(cfg.run_dir / "final"))
    return problems, notes


def run_demo(plan_path: str | None, overrides: list[str]) -> int:
    from cli.main import format_summary
    from rl.config import load_config
    from rl.config_loader import ConfigError
    from rl.trainer import train_job

    plan_path = plan_path or DEFAULT_PLAN
    stages = load_plan(plan_path)
    problems, _ = check_plan(plan_path, overrides)  # what `check` says stops the demo before any stage runs
    if problems:
        raise ConfigError(f"{plan_path}: " + "; ".join(problems))
    started = time.perf_counter()
    summary_path = None
    for i, stage in enumerate(stages):
        last = i == len(stages) - 1
        cfg, resolved = load_config(stage, overrides if last else [])
        final = cfg.run_dir / "final"
        if final.exists() and not last:
            print(f"[demo] {stage}: done already ({final})", flush=True)
            continue
        print(f"[demo] stage {i + 1}/{len(stages)}: {stage} -> {cfg.run_dir}", flush=True)
        t0 = time.perf_counter()
        train_job(cfg, resolved, stage)  # checked first: earlier stages' outputs exist by now
        print(f"[demo] {stage}: {time.perf_counter() - t0:.0f}s", flush=True)
        summary_path = cfg.run_dir / "eval" / "summary.json"
    summary = json.loads(summary_path.read_text())
    print(f"\n[demo] finished in {time.perf_counter() - started:.0f}s. Held-out mean reward per domain:")
    print(format_summary(summary))
    print(f"\nsummary: {summary_path}\nplot:    {summary_path.parent.parent / 'plots' / 'heldout_reward.png'}")
    return 0
