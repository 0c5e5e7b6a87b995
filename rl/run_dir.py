"""Which run a run folder belongs to: a fresh run never writes into another run's folder, and a resumed run is the
same job, not another one under the same name.

A run folder records its resolved config (`config.yaml`). `train` on a folder that already holds a run
(checkpoints or metrics) resumes it only when `run.resume` is true and the config differs at most in keys that
may change between a run and its resumption (how long, how often, where and on how many ranks it runs, logging);
any other difference is refused with the keys named, unless `run.allow_config_change` is set. A fresh run
(`run.resume: false`) on such a folder is refused: nothing of the old run is overwritten or mixed in.
"""

from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import yaml

# Keys a resumed run may change: length and cadence, placement and launch, logging, evaluation engine.
RESUMABLE_CHANGES = (
    "run.resume", "run.allow_config_change", "trainer.steps", "trainer.checkpoint_every", "trainer.keep_checkpoints",
    "trainer.eval_every", "trainer.eval_teachers", "trainer.threads", "trainer.device", "trainer.world_size",
    "trainer.launcher", "trainer.gpus_per_rank", "trainer.collective_timeout_s", "trainer.offload",
    "trainer.weight_sync_mb", "trainer.logprob_chunk_rows", "trainer.activation_checkpointing", "logging.*",
    "cluster.*", "eval.batch_size", "eval.engine", "rollout.num_workers", "rollout.threads_per_worker",
    "rollout.ray_address", "rollout.gpus_per_worker", "rollout.batch_size", "teachers.*.num_workers",
    "teachers.*.threads_per_worker", "teachers.*.gpus_per_worker", "teachers.*.batch_size", "rewards.num_workers",
    "data.decode_workers", "data.prefetch_batches",
)


class RunFolderError(RuntimeError):
    """The run folder holds another run (or this run under another config)."""


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        out = {}
        for i, v in enumerate(data):
            out.update(flatten(v, f"{prefix}{i}."))
        return out
    return {prefix.rstrip("."): data}


def config_changes(old: dict, new: dict) -> list[str]:
    """Keys whose values differ between two resolved configs, except those a resumed run may change."""
    a, b = flatten(old), flatten(new)
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    allowed = [p.replace("*", "[0-9]*") for p in RESUMABLE_CHANGES]
    return [k for k in changed if not any(fnmatch(k, p) for p in allowed)]


def saved_config(path: Path) -> dict:
    """A run folder's recorded config as this version resolves it: keys added to the toolkit since the run was
    written take their defaults, so a run is not 'changed' by a key it could not have had. A record this version
    no longer loads is compared as it was written."""
    from rl.config import load_config

    try:
        return load_config(path)[1]
    except Exception:  # noqa: BLE001  (an old or hand-edited record: the raw keys still say what changed)
        return yaml.safe_load(Path(path).read_text()) or {}


def holds_a_run(run_dir: Path) -> bool:
    return (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()) or (
        (run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").stat().st_size > 0)


def claim_run_dir(run_dir: Path, resolved: dict, resume: bool, allow_change: bool) -> None:
    """Refuse to mix runs (see the module doc), then record this run's resolved config."""
    run_dir = Path(run_dir)
    saved = run_dir / "config.yaml"
    if holds_a_run(run_dir):
        if not resume:
            raise RunFolderError(
                f"{run_dir} already holds a run and run.resume is false: pick another run.name (or run.dir), or "
                "delete the folder to start over; a fresh run never writes into another run's folder")
        if saved.exists() and not allow_change:
            changed = config_changes(saved_config(saved), resolved)
            if changed:
                shown = ", ".join(changed[:8]) + (f" (+{len(changed) - 8} more)" if len(changed) > 8 else "")
                raise RunFolderError(
                    f"{run_dir} holds a run with another config ({shown} differ from {saved}): resuming it under "
                    "this config would mix two jobs. Use another run.name, or set run.allow_config_change=true to "
                    "resume it anyway")
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = saved.with_name("config.yaml.tmp")
    tmp.write_text(yaml.safe_dump(resolved, sort_keys=False))
    tmp.replace(saved)
