"""A comparison stage is a job: written as a YAML file, loaded by the job loader, trained by the one loop
(`rl.trainer.Trainer`), and skipped once its run folder has `final` - unless the job changed since, which is an
error naming the keys (a cached stage of another config would silently change the comparison)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

from rl.config import JobConfig, load_config
from rl.config_loader import ConfigError, deep_merge
from rl.run_dir import config_changes, flatten, saved_config

# Keys `config_changes` lets a resumed run change, but that change what a finished stage is.
_OUTCOME_KEYS = ("trainer.steps",)


def compose_job(fragment: dict[str, Any] | None, common: dict[str, Any], injected: dict[str, Any]) -> dict[str, Any]:
    """The job's keys: its `base:` file(s) < the plan's `common` < the fragment's own keys < what the runner sets."""
    fragment = dict(fragment or {})
    bases = fragment.pop("base", None)
    data = deep_merge(deep_merge(dict(common), fragment), injected)
    return {"base": bases, **data} if bases else data


def write_job(path: Path, data: dict[str, Any]) -> Path:
    """The job file of a stage, beside the comparison's results (`vlpost train` runs it as it is)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    tmp.replace(path)
    return path


def stage_changes(run_dir: Path, resolved: dict[str, Any]) -> list[str]:
    """Keys in which `resolved` differs from the config a run folder was trained under."""
    saved = run_dir / "config.yaml"
    if not saved.exists():
        return []
    old = saved_config(saved)
    changed = config_changes(old, resolved)
    a, b = flatten(old), flatten(resolved)
    return changed + [k for k in _OUTCOME_KEYS if a.get(k) != b.get(k) and k not in changed]


def run_job(path: str | Path, label: str, overrides: list[str] | None = None, log=print) -> JobConfig:
    """Train the job at `path` unless its run is finished under the same config; returns its config (its
    model is `cfg.run_dir / "final"`)."""
    from rl.trainer import train_job

    cfg, resolved = load_config(path, overrides or [])
    final = cfg.run_dir / "final"
    if final.exists():
        changed = stage_changes(cfg.run_dir, resolved)
        if changed:
            shown = ", ".join(changed[:6]) + (f" (+{len(changed) - 6} more)" if len(changed) > 6 else "")
            raise ConfigError(f"{label}: {cfg.run_dir} was trained under another config ({shown} differ); delete "
                              "that folder to retrain it, or give the comparison another run.name")
        log(f"[compare] {label}: done already ({final})")
        return cfg
    log(f"[compare] {label}: training -> {cfg.run_dir}")
    t0 = time.perf_counter()
    train_job(cfg, resolved, f"{label} ({path})")
    log(f"[compare] {label}: {time.perf_counter() - t0:.0f}s")
    return cfg
