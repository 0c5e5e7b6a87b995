"""What each compared method is, as stages of the one training loop (or, for merges, a weight-space operation).

Every trained method starts from the base student, gets the plan's update budget (optimizer updates x
sequences per update, the same generation cap) and is evaluated on the same held-out sets during training:

- `mopd`: the student samples (G responses per prompt, usually 1), each domain's teacher scores the sampled
  tokens; the advantage is the per-token reverse KL (`mopd.estimator`), optionally plus a dense top-k term.
- `mix_rl`: one GSPO run over the mixed domains, each prompt rewarded by its own domain's reward.
- `cascade_rl`: GSPO on one domain after another (`order`), the budget split evenly, each stage from the last.
- `offpolicy_ft`: each teacher answers training prompts of its domain; answers whose reward reaches
  `min_reward` become demonstrations; SFT of the base on them (the `reference` rollout backend).
- `merge_average` / `merge_task_arithmetic`: the teachers' weights averaged, or base + lambda x the sum of task
  vectors with lambda chosen on the training split (`models.merge`); not defined across architectures (n/a).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compare.offpolicy import write_demonstrations
from compare.plan import MethodSpec
from compare.score import normalized_score, one_benchmark
from compare.stages import run_job
from rl.config import load_config
from rl.config_loader import deep_merge

TRAINED = ("mopd", "mix_rl", "cascade_rl", "offpolicy_ft")


@dataclass
class MethodRun:
    """One method in one seed: its held-out reward per domain at the end, its curve (updates -> rewards), and
    the budget it used."""

    heldout: dict[str, float]
    curve: list[tuple[int, dict[str, float]]]
    final: Path
    budget: dict[str, Any] = field(default_factory=dict)


@dataclass
class MergeResult:
    heldout: dict[str, float] | None  # None: not defined here (teachers of other architectures)
    note: str = ""
    details: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------- trained methods


def _budget_keys(cfg, updates: int, sequences: int, where: str) -> tuple[int, int]:
    """(trainer.steps, data.prompts_per_step) that give `updates` optimizer updates of `sequences` sequences."""
    k, g = cfg.algorithm.updates_per_step, cfg.rollout.group_size
    if updates % k:
        raise ValueError(f"{where}: {updates} updates are not a whole number of steps of {k} updates_per_step")
    if (sequences * k) % g:
        raise ValueError(f"{where}: {sequences} sequences per update x {k} updates per step is not a whole number "
                         f"of prompts of group_size {g}")
    return updates // k, sequences * k // g


def sized_job(cmp, label: str, fragment: dict, run_dir: Path, name: str, seed: int, start: Path,
              train: list[dict], updates: int, extra: dict[str, Any] | None = None) -> Path:
    """Write one budgeted stage of a method: its steps and prompts per step give `updates` optimizer updates of
    `budget.sequences_per_update` sequences (read back from its group size and updates per step)."""
    plan = cmp.plan
    injected = cmp.stage_injected(run_dir, name, seed, start, train, cmp.mixed("eval"))
    injected["rollout"] = {"max_new_tokens": plan.budget.max_new_tokens}
    injected["trainer"].update({"eval_at_start": False})
    for key, value in (extra or {}).items():
        injected[key] = value
    cfg = load_config(cmp.write(label, fragment, injected))[0]
    steps, prompts = _budget_keys(cfg, updates, plan.budget.sequences_per_update, label)
    k = cfg.algorithm.updates_per_step
    injected["trainer"].update({"steps": steps, "eval_every": plan.eval_every_updates // k})
    injected["data"]["prompts_per_step"] = prompts
    path = cmp.write(label, fragment, injected)
    load_config(path)  # the final job loads too (bounds, cross-field rules)
    return path


def train_budgeted(cmp, label: str, *args, **kwargs):
    """Write, size and run one budgeted stage of a method; returns its config."""
    return run_job(sized_job(cmp, label, *args, **kwargs), label, log=cmp.log)


def _stage_record(cfg, offset: int) -> tuple[list[tuple[int, dict[str, float]]], dict[str, float]]:
    """A finished stage's held-out curve (in updates, shifted by `offset`) and what it spent."""
    k = cfg.algorithm.updates_per_step
    curve = []
    for path in sorted((cfg.run_dir / "eval").glob("[0-9]*.json")):
        entry = json.loads(path.read_text())
        curve.append((offset + entry["step"] * k, {d: r["mean_reward"] for d, r in entry["domains"].items()}))
    tokens = 0.0
    metrics = cfg.run_dir / "metrics.jsonl"
    if metrics.exists():
        tokens = sum(json.loads(line).get("perf/generated_tokens", 0.0) for line in metrics.read_text().splitlines())
    seqs = cfg.trainer.steps * cfg.data.prompts_per_step * cfg.rollout.group_size
    return curve, {"updates": cfg.trainer.steps * k, "sequences": seqs, "generated_tokens": tokens}


def _finish(cmp, stages: list, extra_budget: dict[str, Any] | None = None) -> MethodRun:
    curve = [(0, dict(cmp.student_scores))]
    budget = {"updates": 0, "sequences": 0, "generated_tokens": 0.0}
    offset = 0
    for cfg in stages:
        points, spent = _stage_record(cfg, offset)
        curve += points
        offset += spent["updates"]
        for key in budget:
            budget[key] += spent[key]
    budget["sequences_per_update"] = budget["sequences"] / max(budget["updates"], 1)
    budget.update(extra_budget or {})
    return MethodRun(heldout=curve[-1][1], curve=curve, final=stages[-1].run_dir / "final", budget=budget)


def check_trained(cmp, name: str, spec: MethodSpec) -> None:
    """Load and size every job of a trained method before any stage runs (start models need not exist yet), so
    a method's mistake stops the comparison before the teachers are trained, not after."""
    placeholder = cmp.root / "base" / "final"
    saved = cmp.student_path, dict(cmp.teacher_paths)
    cmp.student_path = cmp.student_path or placeholder
    cmp.teacher_paths = {d: cmp.teacher_paths.get(d, cmp.root / f"teacher_{d}" / "final") for d in cmp.domains}
    written: list[Path] = []
    try:
        for label, args in _trained_jobs(cmp, name, spec, cmp.plan.seeds[0]):
            written.append(cmp.configs / f"check_{label.replace('/', '_')}.yaml")  # where `sized_job` writes it
            sized_job(cmp, f"check/{label}", *args)
    finally:
        cmp.student_path, cmp.teacher_paths = saved
        for path in written:  # placeholders, not stages: only the real jobs stay in configs/
            path.unlink(missing_ok=True)


def _trained_jobs(cmp, name: str, spec: MethodSpec, seed: int) -> list[tuple[str, tuple]]:
    """(label, `sized_job` arguments) of the jobs of a method that trains from the student directly (for the
    check); cascade stages start from the previous stage's `final`, which the check stands in for."""
    run_dir, budget, label = cmp.root / f"s{seed}", cmp.plan.budget, f"s{seed}/{name}"
    if spec.kind == "cascade_rl":
        order = spec.order or list(cmp.domains)
        share, rest = divmod(budget.updates, len(order))
        return [(f"{label}/{i + 1}_{d}", (spec.job, run_dir / name, f"{i + 1}_{d}", seed, cmp.student_path,
                                          cmp.tasks(d, "train"), share + (1 if i < rest else 0)))
                for i, d in enumerate(order)]
    extra = {"teachers": _teachers(cmp, spec)} if spec.kind == "mopd" else None
    train = cmp.mixed("train")
    if spec.kind == "offpolicy_ft":
        train = [{"source": "demonstrations", "weight": 1.0, "args": {"file": "demonstrations.jsonl",
                                                                     "source": "embedded", "args": {}}}]
    return [(label, (spec.job, run_dir, name, seed, cmp.student_path, train, budget.updates, extra))]


def _teachers(cmp, spec: MethodSpec) -> list[dict[str, Any]]:
    """MOPD's teachers: each domain's, routed by domain, in the domain's view."""
    return [{"name": f"{d}_teacher", "path": str(cmp.teacher_paths[d]), "domains": [d],
             "view": cmp.domains[d].teacher_view, "topk": spec.teacher_topk, **spec.teacher_args}
            for d in cmp.domains]


def run_trained(cmp, name: str, spec: MethodSpec, seed: int) -> MethodRun:
    """Train a method in one seed (cached stages are skipped) and read back its curve and budget."""
    if spec.kind == "offpolicy_ft":
        return _offpolicy_ft(cmp, name, spec, seed)
    stages, start = [], cmp.student_path
    for label, args in _trained_jobs(cmp, name, spec, seed):
        fragment, run_dir, stage, seed_, _, *rest = args
        cfg = train_budgeted(cmp, label, fragment, run_dir, stage, seed_, start, *rest)
        stages.append(cfg)
        start = cfg.run_dir / "final"  # cascade: the next domain starts from this one
    extra_budget = {"order": spec.order or list(cmp.domains)} if spec.kind == "cascade_rl" else None
    return _finish(cmp, stages, extra_budget)


def _offpolicy_ft(cmp, name: str, spec: MethodSpec, seed: int) -> MethodRun:
    """Teachers' answers, filtered by reward, as demonstrations; then SFT of the base on them."""
    run_dir, budget, label = cmp.root / f"s{seed}", cmp.plan.budget, f"s{seed}/{name}"
    train: list[dict[str, Any]] = []
    teacher_tokens, kept = 0, {}
    for d in cmp.domains:
        out = cmp.out / "demonstrations" / f"s{seed}_{name}" / f"{d}.jsonl"
        stats = write_demonstrations(
            cmp.eval_cfg(), cmp.teacher_paths[d], cmp.samples(d, "train")[: spec.prompts_per_domain], out,
            view=cmp.domains[d].teacher_view, min_reward=spec.min_reward, temperature=spec.temperature,
            max_new_tokens=budget.max_new_tokens, seed=seed, keep_truncated=spec.keep_truncated)
        teacher_tokens += stats["generated_tokens"]
        kept[d] = f"{stats['kept']}/{stats['prompts']}"
        cmp.log(f"[compare] {label}: {d} teacher answers kept {kept[d]} (mean reward {stats['mean_reward']:.3f})")
        if stats["kept"]:
            train += [{"source": "demonstrations", "weight": t["weight"],
                       "args": {"file": str(out.resolve()), "source": t["source"], "args": t["args"]}}
                      for t in cmp.tasks(d, "train", cmp.domains[d].weight)]
    if not train:
        raise ValueError(f"{label}: no teacher answer reached min_reward {spec.min_reward}: nothing to train on")
    cfg = train_budgeted(cmp, label, spec.job, run_dir, name, seed, cmp.student_path, train, budget.updates)
    return _finish(cmp, [cfg], {"teacher_generated_tokens": teacher_tokens, "demonstrations_kept": kept})


def with_lr(name: str, spec: MethodSpec, lr: float | None) -> tuple[str, MethodSpec]:
    """The method's run name and spec at learning rate `lr` (None, or the rate its own `job.optim.lr` names: its
    plain run, so a sweep that includes the plan's rate reuses that run and the seeds' runs share its name)."""
    if lr is None or (spec.job.get("optim") or {}).get("lr") == lr:
        return name, spec
    return f"{name}_lr{lr:g}", dataclasses.replace(spec, job=deep_merge(spec.job, {"optim": {"lr": lr}}))


def choose_lr(cmp, name: str, spec: MethodSpec) -> float | None:
    """`lr_sweep`: each learning rate trained in the first seed, scored on the training split; the best normalized
    score there wins (never the held-out sets). None without a sweep, or with the plan's sweeps off."""
    if not spec.lr_sweep or not cmp.plan.sweep_learning_rates:
        return None
    seed = cmp.plan.seeds[0]

    def trained(lr: float) -> tuple[str, Path]:
        run_name, lr_spec = with_lr(name, spec, lr)
        return f"s{seed}_{run_name}_train{spec.select_samples}", run_trained(cmp, run_name, lr_spec, seed).final

    best, _ = pick_on_training_split(cmp, spec.select_samples, {lr: trained for lr in spec.lr_sweep}, "lr",
                                     cmp.out / f"{name}_lr_selection.json", name)
    return best


def pick_on_training_split(cmp, n: int, candidates: dict[float, Callable[[float], tuple[str, Path]]], what: str,
                           record: Path, name: str) -> tuple[float, dict]:
    """The candidate value (a learning rate, a merge's lambda) whose model scores the best normalized score on `n`
    training-split samples per domain (never the held-out sets); `candidates[value](value)` gives the model's
    evaluation tag and folder. The choice and every score are written to `record`."""
    sel_student, sel_teacher = cmp.reference_scores("train", n)
    selection = [s for v in cmp.selection_samples(n).values() for s in v]
    scores: dict[float, float | None] = {}
    for value, model in candidates.items():
        tag, path = model(value)
        rewards = cmp.evaluator()(tag, path, selection)
        scores[value] = normalized_score(one_benchmark(rewards), one_benchmark(sel_student),
                                         one_benchmark(sel_teacher))[1]
    best = _best(scores)
    details = {what: best, "train_normalized": {f"{k:g}": v for k, v in scores.items()}, "select_samples": n}
    record.write_text(json.dumps(details, indent=2))
    cmp.log(f"[compare] {name}: {what} {best:g} (training-split normalized: {_fmt(scores)})")
    return best, details


def _best(scores: dict[float, float | None]) -> float:
    """The key with the highest defined score (the first one on ties or when none is defined)."""
    return max(scores, key=lambda k: float("-inf") if scores[k] is None else scores[k])


def _fmt(scores: dict[float, float | None]) -> str:
    return ", ".join(f"{k:g}: {'n/a' if v is None else f'{v:.3f}'}" for k, v in scores.items())


# ---------------------------------------------------------------------- merges


def _merged(folder: Path, meta: dict[str, Any], make) -> Path:
    """The merged folder, made by `make()` (a state dict) unless one from the same inputs is there already."""
    from models.merge import save_merged

    recorded = folder / "merge.json"
    if recorded.exists() and json.loads(recorded.read_text()) == meta:
        return folder
    return save_merged(make(), meta["reference"], folder, meta)


def run_merge(cmp, name: str, spec: MethodSpec, student: dict[str, float], teacher: dict[str, float]) -> MergeResult:
    """A merge of the teachers (n/a when their weights do not share the base's shapes)."""
    from compare.evaluate import weights_stamp
    from models.merge import MergeError, average_state_dicts, check_same_shapes, load_state_dict, task_arithmetic

    domains = list(cmp.domains)
    folder = cmp.root / "merges" / name
    names = [str(cmp.teacher_paths[d]) for d in domains]
    inputs = {"reference": str(cmp.student_path), "base": weights_stamp(cmp.student_path),
              "models": {n: weights_stamp(Path(n)) for n in names}}
    try:
        base = load_state_dict(cmp.student_path)
        teachers = [load_state_dict(cmp.teacher_paths[d]) for d in domains]
        # the merged model must be the student's architecture: every teacher has the base's tensors and shapes
        check_same_shapes([base, *teachers], [str(cmp.student_path), *names])
        if spec.kind == "merge_average":
            path = _merged(folder, {"method": "average", **inputs}, lambda: average_state_dicts(teachers, names=names))
            return MergeResult(cmp.evaluator()(name, path, cmp.heldout_all()))
        candidates = {}
        for lam in spec.lambdas:
            candidates[lam] = _merged(folder / f"lambda_{lam:g}", {"method": "task_arithmetic", "lambda": lam, **inputs},
                                      lambda lam=lam: task_arithmetic(base, teachers, lam, names))
    except MergeError as err:
        cmp.log(f"[compare] {name}: n/a ({err})")
        return MergeResult(None, note=f"n/a: {err}")
    # lambda is chosen on the training split only
    n = spec.select_samples
    best, details = pick_on_training_split(
        cmp, n, {lam: lambda lam: (f"{name}_lambda{lam:g}_train{n}", candidates[lam]) for lam in candidates},
        "lambda", cmp.out / f"{name}_selection.json", name)
    return MergeResult(cmp.evaluator()(f"{name}_lambda{best:g}", candidates[best], cmp.heldout_all()),
                       details=details)
