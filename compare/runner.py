"""`vlpost compare CONFIG`: every stage of a comparison in order, each cached, then the report.

    prerequisites (job files, as they are)          e.g. the pretrained vision tower
    base student                                    <root>/base
    one teacher per domain (base + domain RL/SFT)   <root>/teacher_<domain>
    held-out scores of the student and teachers     <root>/compare/evals/
    merges (same-origin teachers only)              <root>/merges/<method>
    for each seed: each trained method              <root>/s<seed>/<method>
    summary.json, the Markdown table, plots         <root>/compare/

The trained methods are jobs of the one training loop (`compare.stages.run_job`); what each method is lives in
`compare.methods`, the numbers in `compare.score`, the pictures in `compare.plots`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from compare.evaluate import FolderEvaluator
from compare.plan import ComparePlan, DomainSpec, StageSpec, load_plan
from compare.stages import compose_job, run_job, write_job
from rl.config import JobConfig, TaskConfig, load_config
from rl.data import load_tasks
from tasks.base import Sample

SEEDED_SOURCES = ("embedded", "embedded_video", "demonstrations")
STUDENT, TEACHERS = "base_student", "teacher_reference"


class Comparison:
    """The plan's shared stages and data, which every method builds on."""

    def __init__(self, plan: ComparePlan, log=print):
        self.plan, self.log = plan, log
        self.root, self.out = plan.root, plan.out
        self.configs = self.out / "configs"
        self.student_path: Path | None = None
        self.teacher_paths: dict[str, Path] = {}
        self.student_scores: dict[str, float] = {}  # held-out, per domain: step 0 of every method's curve
        self._eval_cfg: JobConfig | None = None
        self._heldout: dict[str, list[Sample]] | None = None

    # ------------------------------------------------------------------ data

    @property
    def domains(self) -> dict[str, DomainSpec]:
        return self.plan.domains

    def tasks(self, domain: str, split: str, weight: float = 1.0) -> list[dict[str, Any]]:
        """A domain's task sources as job keys, the data seed pinned (every stage reads the same sets)."""
        out = []
        for task in getattr(self.domains[domain], split):
            args = dict(task.args)
            if task.source in SEEDED_SOURCES:
                args.setdefault("seed", self.plan.data_seed)
            out.append({"source": task.source, "args": args, "weight": task.weight * weight})
        return out

    def mixed(self, split: str, domains: list[str] | None = None) -> list[dict[str, Any]]:
        """Every domain's sources (training: each weighted by its domain's share)."""
        return [t for d in (domains or list(self.domains))
                for t in self.tasks(d, split, self.domains[d].weight if split == "train" else 1.0)]

    def samples(self, domain: str, split: str) -> list[Sample]:
        tasks = [TaskConfig(**t) for t in self.tasks(domain, split)]
        samples = [s for s in load_tasks(tasks, self.plan.data_seed) if s.domain == domain]
        if not samples:
            raise ValueError(f"domains.{domain}.{split}: its sources yield no sample of domain {domain!r} (domain "
                             "keys are the samples' domain names)")
        return samples

    def heldout(self) -> dict[str, list[Sample]]:
        if self._heldout is None:
            self._heldout = {d: self.samples(d, "eval") for d in self.domains}
        return self._heldout

    def heldout_all(self) -> list[Sample]:
        return [s for samples in self.heldout().values() for s in samples]

    # ------------------------------------------------------------------ jobs

    def write(self, label: str, fragment: dict | None, injected: dict[str, Any]) -> Path:
        return write_job(self.configs / f"{label.replace('/', '_')}.yaml",
                         compose_job(fragment, self.plan.common, injected))

    def stage_injected(self, run_dir: Path, name: str, seed: int, start: Path | None,
                       train: list[dict] | None, eval_: list[dict] | None) -> dict[str, Any]:
        """What the runner sets in every job it writes: run folder, start model, data (None: the job's own),
        saving only what the next stage needs (the last checkpoint)."""
        injected: dict[str, Any] = {
            "run": {"dir": str(run_dir), "name": name, "seed": seed},
            "trainer": {"checkpoint_every": 0, "keep_checkpoints": 1, "eval_teachers": False},
        }
        data = {k: v for k, v in (("train", train), ("eval", eval_)) if v is not None}
        if data:
            injected["data"] = data
        if start is not None:
            injected["model"] = {"path": str(start), "tokenizer": "model"}
        return injected

    def run_stage(self, label: str, spec: StageSpec, injected: dict[str, Any]) -> Path:
        """A student or teacher: a given folder, an external job file run as it is, or a job fragment trained
        under the comparison (its steps scaled by `stage_steps_scale`; evaluated stand-alone, not in the loop)."""
        kind = spec.source()
        if kind == "path":
            if not Path(spec.path).exists():
                raise FileNotFoundError(f"{label}: model folder {spec.path} not found")
            return Path(spec.path)
        if kind == "config":
            return run_job(spec.config, label, log=self.log).run_dir / "final"
        injected = _deep_set(injected, "trainer", {"eval_every": 0, "eval_at_start": False})
        path = self.write(label, spec.job, injected)
        if self.plan.stage_steps_scale != 1.0:
            steps = load_config(path)[0].trainer.steps
            injected = _deep_set(injected, "trainer", {"steps": max(1, round(steps * self.plan.stage_steps_scale))})
            path = self.write(label, spec.job, injected)
        return run_job(path, label, log=self.log).run_dir / "final"

    # ------------------------------------------------------------------ shared stages

    def build_origin(self) -> None:
        """Prerequisites, the base student, and one teacher per domain."""
        for i, job_file in enumerate(self.plan.prerequisites):
            run_job(job_file, f"prerequisite {i + 1} ({job_file})", log=self.log)
        # the base student keeps its own job's data (a generalist's narrower mix): only its run folder is set
        self.student_path = self.run_stage("base", self.plan.student, self.stage_injected(
            self.root, "base", self.plan.data_seed, None, None, None))
        for d, spec in self.domains.items():
            injected = self.stage_injected(self.root, f"teacher_{d}", self.plan.data_seed, self.student_path,
                                           self.tasks(d, "train"), self.tasks(d, "eval"))
            self.teacher_paths[d] = self.run_stage(f"teacher_{d}", spec.teacher, injected)

    def eval_cfg(self) -> JobConfig:
        """The settings of every stand-alone evaluation (`eval_job` over `common`)."""
        if self._eval_cfg is None:
            path = self.write("eval", self.plan.eval_job, {
                "run": {"dir": str(self.root), "name": "eval", "seed": self.plan.data_seed},
                "model": {"path": str(self.student_path), "tokenizer": "model"},
                "algorithm": {"advantage": "sft", "policy_loss": "nll"},  # never trained: only eval.*, rewards.*
                "data": {"train": self.mixed("train"), "eval": self.mixed("eval")}})
            self._eval_cfg = load_config(path)[0]
        return self._eval_cfg

    def evaluator(self) -> FolderEvaluator:
        return FolderEvaluator(self.eval_cfg(), self.out / "evals", log=self.log)

    def reference_scores(self, split: str = "eval", n: int | None = None) -> tuple[dict[str, float], dict[str, float]]:
        """(base student per domain, each teacher on its own domain) on the held-out sets, or on the first `n`
        training samples per domain (split 'train': what lambda selection sees)."""
        evaluate = self.evaluator()
        sets = self.heldout() if split == "eval" else self.selection_samples(n or 64)
        suffix = "" if split == "eval" else f"_train{n}"
        student = evaluate(f"{STUDENT}{suffix}", self.student_path, [s for v in sets.values() for s in v])
        teacher = {d: evaluate(f"teacher_{d}{suffix}", self.teacher_paths[d], sets[d],
                               self.domains[d].teacher_view)[d] for d in self.domains}
        return student, teacher

    def selection_samples(self, n: int) -> dict[str, list[Sample]]:
        """The first `n` training samples of each domain: where lambdas are chosen (never the held-out set)."""
        return {d: self.samples(d, "train")[:n] for d in self.domains}


def _deep_set(data: dict[str, Any], key: str, values: dict[str, Any]) -> dict[str, Any]:
    return {**data, key: {**data.get(key, {}), **values}}


def run_compare(plan_path: str | None, overrides: list[str], log=print) -> dict[str, Any]:
    """Run (or resume) a comparison and write its report; returns the summary."""
    from compare.methods import TRAINED, check_trained, choose_lr, run_merge, run_trained, with_lr
    from compare.report import write_report

    started = time.perf_counter()
    plan = load_plan(plan_path or "configs/compare_tiny.yaml", overrides)
    cmp = Comparison(plan, log=log)
    cmp.out.mkdir(parents=True, exist_ok=True)
    methods = {n: m for n, m in plan.methods.items() if m.enabled}
    for name, spec in methods.items():  # every method's jobs load and fit the budget before anything trains
        if spec.kind in TRAINED:
            check_trained(cmp, name, spec)
    cmp.build_origin()
    student, teacher = cmp.reference_scores()
    cmp.student_scores = student
    merges = {n: run_merge(cmp, n, m, student, teacher) for n, m in methods.items() if m.kind not in TRAINED}
    notes = {n: f"lambda {m.details['lambda']:g}" for n, m in merges.items() if "lambda" in m.details}
    lrs = {n: choose_lr(cmp, n, m) for n, m in methods.items() if m.kind in TRAINED}  # on the training split
    notes.update({n: f"lr {lr:g}" for n, lr in lrs.items() if lr is not None})
    trained: dict[str, list] = {n: [] for n in lrs}
    summary: dict[str, Any] = {}
    for seed in plan.seeds:
        for name in trained:
            trained[name].append(run_trained(cmp, *with_lr(name, methods[name], lrs[name]), seed))
        summary = write_report(cmp, student, teacher, trained, merges, notes, log=log)
    if not trained:
        summary = write_report(cmp, student, teacher, trained, merges, notes, log=log)
    log(f"[compare] finished in {time.perf_counter() - started:.0f}s: {cmp.out / 'summary.json'}")
    (cmp.out / "wall_time_s.json").write_text(json.dumps({"last_invocation_s": time.perf_counter() - started}))
    return summary
