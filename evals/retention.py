"""The retention view of a MOPD run: per checkpoint, each domain's held-out score beside each teacher's score on
that domain and the ratio student / teacher, i.e. which capability the student inherits and which it loses.

Inputs are eval results as `watch` writes them (`{"step", "domains": {d: {"mean_reward", "n"}}, "teachers": ...}`)
and teacher scores `{teacher: {domain: {"mean_reward", "n"} | float}}` (by default each result's `teachers`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from collections.abc import Sequence


def _value(score: Any) -> float | None:
    if isinstance(score, dict):
        score = score.get("mean_reward")
    return None if score is None else float(score)


def retention_table(results: Sequence[dict[str, Any]],
                    teacher_scores: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Rows `{"step", "domain", "student", "n", "teacher", "teacher_score", "ratio"}`, by step then domain.

    A domain no teacher covers still gets a row (teacher None). The ratio is None when the teacher scores 0.
    """
    rows = []
    for result in sorted(results, key=lambda r: r["step"]):
        teachers = teacher_scores if teacher_scores is not None else result.get("teachers", {})
        for domain, stats in sorted(result.get("domains", {}).items()):
            student = _value(stats)
            base = {"step": int(result["step"]), "domain": domain, "student": student, "n": stats.get("n")}
            covering = [(name, _value(scores[domain])) for name, scores in sorted(teachers.items()) if domain in scores]
            if not covering:
                rows.append({**base, "teacher": None, "teacher_score": None, "ratio": None})
            for name, teacher in covering:
                ratio = student / teacher if teacher and student is not None else None
                rows.append({**base, "teacher": name, "teacher_score": teacher, "ratio": ratio})
    return rows


def format_retention(rows: Sequence[dict[str, Any]]) -> str:
    """Terminal table: step, domain, student, teacher, teacher score, student / teacher."""
    def cell(v: Any, pct: bool = False) -> str:
        if v is None:
            return "-"
        return f"{100 * v:.1f}%" if pct else f"{v:.4f}" if isinstance(v, float) else str(v)

    table = [("step", "domain", "student", "teacher", "teacher score", "student/teacher")]
    table += [(cell(r["step"]), r["domain"], cell(r["student"]), cell(r["teacher"]), cell(r["teacher_score"]),
               cell(r["ratio"], pct=True)) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) if i in (1, 3) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_retention(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """PNG with one panel per domain: the student's score over steps, each teacher as a dashed level line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = sorted({r["domain"] for r in rows})
    if not domains:
        raise ValueError("no rows to plot")
    cols = min(3, len(domains))
    nrows = (len(domains) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.5 * nrows), squeeze=False)
    for ax, domain in zip(axes.flat, domains):
        mine = [r for r in rows if r["domain"] == domain]
        steps = sorted({r["step"] for r in mine})
        student = {r["step"]: r["student"] for r in mine}
        ax.plot(steps, [student[s] for s in steps], marker="o", label="student")
        for teacher in sorted({r["teacher"] for r in mine if r["teacher"] is not None}):
            levels = {r["step"]: r["teacher_score"] for r in mine if r["teacher"] == teacher}
            ax.plot(steps, [levels.get(s) for s in steps], linestyle="--", label=f"teacher: {teacher}")
        ax.set_title(domain)
        ax.set_xlabel("step")
        ax.set_ylabel("mean reward")
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(domains):]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def retention_report(run_dir: str | Path, teacher_scores: dict[str, dict[str, Any]] | None = None,
                     out_dir: str | Path | None = None, results_dir: str = "eval") -> list[dict[str, Any]]:
    """Read a run's `eval/<step>.json` results and write `eval/retention.json` and `plots/retention.png`
    (under `out_dir` when given); returns the rows (print them with `format_retention`)."""
    from evals.watch import load_results

    run_dir = Path(run_dir)
    rows = retention_table(load_results(run_dir, results_dir), teacher_scores)
    out = Path(out_dir) if out_dir is not None else run_dir
    (out / results_dir).mkdir(parents=True, exist_ok=True)
    (out / results_dir / "retention.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n", encoding="utf-8")
    if rows:
        plot_retention(rows, out / "plots" / "retention.png")
    return rows
