"""Pictures people would rather look at than read: held-out reward per domain over steps, reward curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_eval_history(history: list[dict[str, Any]], teacher_eval: dict[str, Any], path: Path) -> Path:
    """One line per domain (held-out mean reward vs step), teachers' scores as dashed lines of the same colour."""
    path.parent.mkdir(parents=True, exist_ok=True)
    history = sorted(history, key=lambda e: e["step"])
    domains = sorted({d for e in history for d in e["domains"]})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, domain in enumerate(domains):
        color = f"C{i % 10}"
        steps = [e["step"] for e in history if domain in e["domains"]]
        values = [e["domains"][domain]["mean_reward"] for e in history if domain in e["domains"]]
        ax.plot(steps, values, marker="o", color=color, label=f"student: {domain}")
        for name, report in (teacher_eval or {}).items():
            if domain in report:
                ax.axhline(report[domain]["mean_reward"], color=color, linestyle="--", linewidth=1,
                           label=f"teacher {name}: {domain}")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out mean reward")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_metric_curves(records: list[dict[str, float]], prefix: str, path: Path) -> Path | None:
    """Every metric starting with `prefix` (e.g. 'reward/') over steps, from metrics.jsonl records."""
    keys = sorted({k for r in records for k in r if k.startswith(prefix)})
    if not keys:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        pts = [(r["step"], r[key]) for r in records if key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=key)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
