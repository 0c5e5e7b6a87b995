"""Metrics: JSON lines (always), TensorBoard and W&B (optional), and a progress bar with reward and KL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


class MetricsLogger:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int, progress: bool = True,
                 tensorboard: bool = True, wandb: bool = False, wandb_project: str = "vlpost",
                 config: dict[str, Any] | None = None, desc: str = "train"):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keep_records_up_to(self.path, start_step)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        self.wandb = None
        if wandb:
            try:
                import wandb as wandb_module
            except ImportError as err:
                raise ImportError("logging.wandb=true needs the wandb package: pip install wandb") from err
            self.wandb = wandb_module.init(project=wandb_project, name=Path(run_dir).name, config=config, resume="allow")
        import sys

        # In a log file (no terminal) a redraw per step is noise: refresh every 10 s there.
        interval = 0.1 if sys.stderr.isatty() else 10.0
        self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, disable=not progress, dynamic_ncols=True,
                        mininterval=interval)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(key, value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def progress(self, metrics: dict[str, float]) -> None:
        shown = {}
        keys = (("reward/mean", "reward"), ("mopd/reverse_kl", "kl"), ("actor/loss", "loss"), ("time/step_s", "s/step"))
        for key, label in keys:
            if key in metrics:
                shown[label] = f"{metrics[key]:.3f}"
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def keep_records_up_to(path: Path, step: int) -> None:
    """A resumed run repeats the steps after its checkpoint: drop their old records (and a line cut short by a
    kill) so that every step has exactly one record."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    tmp.replace(path)


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
