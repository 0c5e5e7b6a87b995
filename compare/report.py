"""The comparison's outputs: `summary.json` (the schema of `compare.score.build_summary`), the Markdown table in
the terminal (and `table.md`), and one plot per domain of held-out reward against updates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from compare.score import build_summary, format_table, leader_verdict, mean_std
from compare.runner import STUDENT, TEACHERS


def budget_record(cmp, trained: dict[str, list]) -> dict[str, Any]:
    """The plan's budget and what each trained method used (means over its seeds)."""
    b = cmp.plan.budget
    per_method = {}
    for name, runs in trained.items():
        if not runs:
            continue
        spent: dict[str, Any] = {}
        for key, value in runs[0].budget.items():
            if isinstance(value, (int, float)):
                spent[key] = sum(r.budget[key] for r in runs) / len(runs)
            else:
                spent[key] = value
        per_method[name] = spent
    return {"updates": b.updates, "sequences_per_update": b.sequences_per_update,
            "max_new_tokens": b.max_new_tokens, "seeds": list(cmp.plan.seeds), "methods": per_method,
            "definition": "optimizer updates x sequences per update, each response at most max_new_tokens; "
                          "generated_tokens = response tokens of the sequences trained on (for offpolicy_ft the "
                          "teachers' kept answers; teacher_generated_tokens counts all their answers)"}


def write_report(cmp, student: dict[str, float], teacher: dict[str, float], trained: dict[str, list],
                 merges: dict[str, Any], notes: dict[str, str] | None = None, log=print) -> dict[str, Any]:
    """`notes`: what was chosen on the training split per method (lambda, lr), shown beside its label."""
    results: dict[str, Any] = {STUDENT: [student], TEACHERS: [teacher]}
    for name, runs in trained.items():
        results[name] = [r.heldout for r in runs]
    for name, merge in merges.items():
        results[name] = None if merge.heldout is None else [merge.heldout]
    order = [STUDENT, TEACHERS, *cmp.plan.methods]
    results = {n: results[n] for n in order if n in results}
    summary = build_summary(results, student, teacher, budget_record(cmp, trained))
    out = cmp.out
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(out / "summary.json")
    labels = {STUDENT: "base student", TEACHERS: "each teacher on its own domain"}
    labels.update({n: m.label or n for n, m in cmp.plan.methods.items()})
    for name, note in (notes or {}).items():
        labels[name] += f" ({note})"
    table = format_table(summary, labels)
    kinds = {n: m.kind for n, m in cmp.plan.methods.items()}
    verdict = leader_verdict(summary, [n for n in order if n not in (STUDENT, TEACHERS)], labels, kinds)
    (out / "table.md").write_text(f"{table}\n\n{verdict}\n")
    seeds = len(next(iter(trained.values()), []))
    log(f"\n[compare] held-out reward per domain and normalized score (mean ± std over {seeds} seed(s)):")
    log(table)
    log(verdict)
    plots = plot_curves(cmp, student, teacher, trained, out / "plots")
    log(f"\nsummary: {out / 'summary.json'}\nplots:   {', '.join(str(p) for p in plots)}")
    return summary


def plot_curves(cmp, student: dict[str, float], teacher: dict[str, float], trained: dict[str, list],
                folder: Path) -> list[Path]:
    """Per domain: each trained method's held-out reward against optimizer updates (mean over seeds, band: ±
    std), with the base student and the domain's teacher as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for domain in cmp.domains:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, (name, runs) in enumerate(trained.items()):
            if not runs:
                continue
            steps = sorted({u for r in runs for u, v in r.curve if domain in v})
            means, stds = [], []
            for u in steps:
                m, s = mean_std([v[domain] for r in runs for uu, v in r.curve if uu == u and domain in v])
                means.append(m)
                stds.append(s)
            color = f"C{i % 10}"
            ax.plot(steps, means, marker="o", color=color, label=cmp.plan.methods[name].label or name)
            ax.fill_between(steps, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                            color=color, alpha=0.15)
        ax.axhline(teacher[domain], color="k", linestyle="--", linewidth=1, label="teacher")
        ax.axhline(student[domain], color="grey", linestyle=":", linewidth=1, label="base student")
        ax.set_title(f"{domain}: held-out reward")
        ax.set_xlabel("optimizer updates")
        ax.set_ylabel("held-out mean reward")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        path = folder / f"{domain}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
