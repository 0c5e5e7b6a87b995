"""The comparison's numbers: the normalized score (share of the student-to-teacher gap closed), its mean and
spread over seeds, the `summary.json` record and the Markdown table.

Per domain d with benchmarks b (MOPD paper, Ma et al.):

    G_d = sum_b (score_b - student_b) / sum_b (teacher_b - student_b)

and the normalized score is the mean of G_d over the domains. 0 is the base student, 1 each teacher on its own
domain. A domain whose teacher is no better than the student (denominator <= 0) has no gap to close: its G_d is
undefined (None) and the mean is over the other domains.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

Scores = Mapping[str, Mapping[str, float]]  # domain -> benchmark -> score


def domain_gap_closed(scores: Mapping[str, float], student: Mapping[str, float],
                      teacher: Mapping[str, float]) -> float | None:
    """G_d over the benchmarks of one domain (those the student and teacher were scored on); None without a gap."""
    benchmarks = [b for b in teacher if b in student]
    missing = [b for b in benchmarks if b not in scores]
    if missing:
        raise KeyError(f"no score for benchmark(s) {missing}")
    gap = sum(teacher[b] - student[b] for b in benchmarks)
    if not gap > 0:
        return None
    return sum(scores[b] - student[b] for b in benchmarks) / gap


def normalized_score(scores: Scores, student: Scores, teacher: Scores) -> tuple[dict[str, float | None], float | None]:
    """(G_d per domain, their mean over the domains where it is defined; None if none is)."""
    per_domain = {d: domain_gap_closed(scores[d], student[d], teacher[d]) for d in teacher}
    defined = [g for g in per_domain.values() if g is not None]
    return per_domain, (sum(defined) / len(defined) if defined else None)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def one_benchmark(per_domain: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """`{domain: reward}` as `{domain: {"heldout": reward}}`: one held-out set per domain."""
    return {d: {"heldout": float(v)} for d, v in per_domain.items()}


def method_entry(per_seed: Sequence[Mapping[str, float]], student: Mapping[str, float],
                 teacher: Mapping[str, float]) -> dict[str, Any]:
    """The summary record of one method from its held-out reward per domain in each seed: the normalized score
    per seed, then mean and std over seeds; per domain the reward's mean and std."""
    if not per_seed:
        return {"normalized": None, "normalized_std": None, "domains": {}}
    norms = [normalized_score(one_benchmark(s), one_benchmark(student), one_benchmark(teacher))[1]
             for s in per_seed]
    defined = [n for n in norms if n is not None]
    norm, norm_std = mean_std(defined) if defined else (None, None)
    domains = {}
    for d in teacher:
        m, s = mean_std([float(seed[d]) for seed in per_seed])
        domains[d] = {"mean": m, "std": s}
    return {"normalized": norm, "normalized_std": norm_std, "domains": domains}


def build_summary(results: Mapping[str, Sequence[Mapping[str, float]] | None], student: Mapping[str, float],
                  teacher: Mapping[str, float], budget: Mapping[str, Any]) -> dict[str, Any]:
    """`summary.json`: `{"methods": {m: {"normalized", "normalized_std", "domains": {d: {"mean", "std"}}}},
    "budget": {...}}`. A method given as None (not defined in this setting, e.g. a merge of teachers of other
    architectures) gets null scores and no domains."""
    methods = {}
    for name, per_seed in results.items():
        methods[name] = (method_entry(per_seed, student, teacher) if per_seed is not None
                         else {"normalized": None, "normalized_std": None, "domains": {}})
    return {"methods": methods, "budget": dict(budget)}


def _pm(mean: float | None, std: float | None, digits: int = 3) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std else f"{mean:.{digits}f}"


def format_table(summary: Mapping[str, Any], labels: Mapping[str, str] | None = None) -> str:
    """The Markdown table: method, normalized score, each domain's held-out reward (mean ± std over seeds), and
    the budget each trained method used."""
    methods = summary["methods"]
    domains = list(next((m["domains"] for m in methods.values() if m["domains"]), {}))
    spent = summary.get("budget", {}).get("methods", {})
    head = ["method", "normalized", *domains, "updates x seqs/update", "generated tokens"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, m in methods.items():
        b = spent.get(name, {})
        use = f"{b['updates']:g} x {b['sequences_per_update']:g}" if b.get("updates") else "-"
        tokens = f"{b['generated_tokens']:,.0f}" if b.get("generated_tokens") else "-"
        cells = [(labels or {}).get(name, name), _pm(m["normalized"], m["normalized_std"])]
        cells += [_pm(m["domains"][d]["mean"], m["domains"][d]["std"]) if d in m["domains"] else "n/a"
                  for d in domains]
        lines.append("| " + " | ".join([*cells, use, tokens]) + " |")
    return "\n".join(lines)


def leader_verdict(summary: Mapping[str, Any], candidates: Sequence[str], labels: Mapping[str, str] | None = None,
                   kinds: Mapping[str, str] | None = None) -> str:
    """One line: the first of `candidates` by mean normalized score, and whether it leads every other method by
    more than the seeds' spread (its margin over each exceeds the larger of the two standard deviations). With
    `kinds` (method -> kind), the leader is measured against the methods of other kinds only: variants of one
    method (MOPD at two temperatures) are not each other's alternatives."""
    methods = summary["methods"]
    scored = [(n, methods[n]["normalized"], methods[n]["normalized_std"] or 0.0) for n in candidates
              if n in methods and methods[n]["normalized"] is not None]
    scored.sort(key=lambda row: -row[1])
    if not scored:
        return "first: no method scored"
    name = (labels or {}).get
    (first, mean, std) = scored[0]
    rest = [row for row in scored[1:] if kinds is None or kinds.get(row[0]) != kinds.get(first)]
    if not rest:
        return f"first: {name(first, first)} {_pm(mean, std)}; no method of another kind scored"
    clear = all(mean - m > max(std, s) for _, m, s in rest)
    other, m, s = min(rest, key=lambda row: (mean - row[1]) - max(std, row[2]))
    verdict = "yes" if clear else "no"
    if std == 0 and all(s == 0 for _, _, s in rest):
        verdict += " (one seed: no spread measured)"
    against = "every method of another kind" if kinds is not None else "every other method"
    return (f"first: {name(first, first)} {_pm(mean, std)}; ahead of {against} by more than the seeds' spread: "
            f"{verdict} (closest: {name(other, other)} {_pm(m, s)}, margin {mean - m:.3f} against spread "
            f"{max(std, s):.3f})")
