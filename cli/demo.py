"""`demo`: the embedded-default pipeline end to end, each stage a `train` job; finished stages are skipped.

teachers (one SFT job per domain) -> weak base student (short SFT on the mix) -> MOPD -> final report
(student before / after beside each teacher, per domain) and the held-out reward plot.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml


def run_demo(plan_path: str | None, overrides: list[str]) -> int:
    from cli.main import format_summary
    from rl.config import load_config
    from rl.trainer import Trainer

    plan_path = plan_path or "configs/demo.yaml"
    plan = yaml.safe_load(Path(plan_path).read_text())
    stages = plan.get("stages") or []
    if not stages:
        raise ValueError(f"{plan_path}: 'stages' lists no configs")
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
        trainer = Trainer(cfg, resolved)
        try:
            trainer.fit()
        finally:
            trainer.close()
        print(f"[demo] {stage}: {time.perf_counter() - t0:.0f}s", flush=True)
        summary_path = cfg.run_dir / "eval" / "summary.json"
    summary = json.loads(summary_path.read_text())
    print(f"\n[demo] finished in {time.perf_counter() - started:.0f}s. Held-out mean reward per domain:")
    print(format_summary(summary))
    print(f"\nsummary: {summary_path}\nplot:    {summary_path.parent.parent / 'plots' / 'heldout_reward.png'}")
    return 0
