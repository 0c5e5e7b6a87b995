"""The comparison plan (`vlpost compare CONFIG`): what is trained, from what, with which budget, and how it is
scored. Every option is documented where it is declared; the file composes with `base:` and takes dotted
overrides like a job file (`rl.config_loader`).

A plan names one base student, one teacher per domain and the methods. Stages that train are *job fragments*
(`job:` mappings, which may start from a job file with `base:`, resolved relative to the file that declares it):
the runner adds what a stage must share with the others (the model it starts from, its data, its budget, its
run folder) and trains it through the one training loop (`rl.trainer.Trainer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from core.options import option
from rl.config import TaskConfig

METHOD_KINDS = ("mopd", "mix_rl", "cascade_rl", "offpolicy_ft", "merge_average", "merge_task_arithmetic")
MERGE_KINDS = ("merge_average", "merge_task_arithmetic")
DEFAULT_PLAN = "configs/compare_tiny.yaml"


@dataclass
class StageSpec:
    """Where a model comes from: exactly one of `job`, `config`, `path`."""

    job: dict[str, Any] | None = option(
        "Job keys of a stage trained under the comparison's folder (`base:` a job file, relative to the file that "
        "declares it); the runner sets its start model, data, run folder and seed.", default=None)
    config: str | None = option(
        "A job file run as it is, in its own run folder (like a demo stage; skipped once it has `final`). A "
        "derived plan that swaps a `job` for a `config` sets `job: null`.", default=None)
    path: str | None = option("An existing model folder (nothing is trained).", default=None)

    def source(self) -> str:
        given = [k for k in ("job", "config", "path") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of job, config, path (got {given or 'none'}); a derived plan that "
                             "replaces one sets the other to null")
        return given[0]


@dataclass
class DomainSpec:
    train: list[TaskConfig] = option("Training task sources of the domain (teacher, methods, lambda selection).")
    eval: list[TaskConfig] = option("Held-out task sources of the domain (every reported number).")
    teacher: StageSpec = option("The domain's teacher: the base student after domain RL or SFT (same origin), or "
                                "any model sharing the student's vocabulary (cross-modal setting).")
    teacher_view: Literal["native", "text", "timestamps", "no_video"] = option(
        "What the teacher sees of a sample (MOPD scoring, its own evaluation, its off-policy answers).",
        default="native")
    weight: float = option("Share of the domain's prompts in the mixed methods (MOPD, Mix-RL, off-policy FT).",
                           default=1.0, gt=0)


@dataclass
class MethodSpec:
    kind: str = option(f"What the method is: one of {', '.join(METHOD_KINDS)} (docs/compare.md).")
    label: str = option("Its name in the table (default: the method's key).", default="")
    enabled: bool = option("Run it (false: listed, skipped).", default=True)
    job: dict[str, Any] = option(
        "Job keys of its training runs (algorithm, optimizer, rollout; `base:` a job file). The runner sets the "
        "start model, data, teachers, steps and prompts per step from the budget.", default_factory=dict)
    teacher_topk: int = option("mopd: each teacher also returns its top-k log-probs (needed by a dense "
                               "`algorithm.logit_losses` term; 0 = sampled token only).", default=0, ge=0)
    teacher_args: dict[str, Any] = option("mopd: extra keys of every injected `teachers[]` entry (num_workers, "
                                          "engine_args, batch_size, ...).", default_factory=dict)
    order: list[str] = option("cascade_rl: the domain order (default: the plan's domain order); the update budget "
                              "is split evenly, the remainder going to the first domains.", default_factory=list)
    prompts_per_domain: int = option("offpolicy_ft: training prompts each teacher answers (one sampled answer "
                                     "each).", default=1024, ge=1)
    min_reward: float = option("offpolicy_ft: an answer is kept as a demonstration when its domain reward is at "
                               "least this (1.0: correct answers only).", default=1.0)
    temperature: float = option("offpolicy_ft: the teachers' sampling temperature (0: greedy).", default=1.0, ge=0)
    keep_truncated: bool = option("offpolicy_ft: also keep answers cut off at max_new_tokens (toy smoke runs of "
                                  "untrained models; a real comparison keeps finished answers only).", default=False)
    lr_sweep: list[float] = option(
        "Trained methods: learning rates tried (full-budget runs of the first seed, as `<method>_lr<lr>`; the rate "
        "that the method's `job.optim.lr` names is its plain `<method>` run), scored on the training split "
        "(`select_samples` per domain); the best normalized score there is used for every seed. Empty: the job's "
        "own optim.lr.", default_factory=list, gt=0)
    lambdas: list[float] = option("merge_task_arithmetic: the lambdas tried; the one with the best normalized "
                                  "score on the training split is reported.",
                                  default_factory=lambda: [0.3, 0.5, 0.7, 1.0])
    select_samples: int = option("Training-split samples per domain that choose lambda (merge_task_arithmetic) or "
                                 "the learning rate (lr_sweep).", default=64, ge=1)


@dataclass
class BudgetSpec:
    updates: int = option("Optimizer updates of every trained method (trainer.steps x updates_per_step).", ge=1)
    sequences_per_update: int = option(
        "Sequences (prompt + response) per optimizer update: prompts_per_step x group_size / updates_per_step.",
        ge=1)
    max_new_tokens: int = option("Generation cap of every method's rollouts (and of the teachers' answers).", ge=1)


@dataclass
class CompareRun:
    name: str = option("The comparison's folder under `dir`: stages in `<dir>/<name>/...`, results in "
                       "`<dir>/<name>/compare/`.", default="compare")
    dir: str = option("Parent folder.", default="runs")


@dataclass
class ComparePlan:
    run: CompareRun = option("Where the comparison lives.", default_factory=CompareRun)
    seeds: list[int] = option("Seeds of the trained methods (run.seed); student, teachers and merges are built "
                              "once.", default_factory=lambda: [0, 1, 2])
    data_seed: int = option("Seed of the embedded data (train and held-out sets), the same for every stage and "
                            "seed, so all models are scored on one held-out set.", default=0)
    prerequisites: list[str] = option("Job files run first, as they are (e.g. the pretrained vision tower the "
                                      "base student starts from).", default_factory=list)
    common: dict[str, Any] = option("Job keys merged into every job the comparison writes (after its `base:`, "
                                    "before its own keys).", default_factory=dict)
    eval_job: dict[str, Any] = option("Job keys of the stand-alone evaluations (base student, teachers, merges, "
                                      "lambda selection): its eval.* and rewards.* are used.", default_factory=dict)
    student: StageSpec = option("The base student every method and teacher starts from.",
                                default_factory=StageSpec)
    domains: dict[str, DomainSpec] = option("The domains, in order: data, teacher.", default_factory=dict)
    methods: dict[str, MethodSpec] = option("The methods compared, by key.", default_factory=dict)
    budget: BudgetSpec = option("The update budget every trained method gets.",
                                default_factory=lambda: BudgetSpec(300, 40, 40))
    eval_every_updates: int = option("Held-out evaluation of trained methods every N updates (the curves); the "
                                     "end is always evaluated.", default=100, ge=0)
    sweep_learning_rates: bool = option(
        "Run the methods' `lr_sweep`s (the first seed trains every rate). false: each method trains at its own "
        "`job.optim.lr` only; a plan whose rates are the ones its sweep chose then reruns its seeds without the "
        "sweep's extra runs.", default=True)
    stage_steps_scale: float = option("Multiplies trainer.steps of the student and teacher jobs (smoke runs; "
                                      "external `config` stages are run as they are).", default=1.0, gt=0)

    def validate(self) -> None:
        if not self.domains:
            raise ValueError("domains: none given")
        if not self.seeds:
            raise ValueError("seeds: none given")
        self.student.source()
        for d, spec in self.domains.items():
            try:
                spec.teacher.source()
            except ValueError as err:
                raise ValueError(f"domains.{d}.teacher: {err}") from None
        for name, m in self.methods.items():
            if m.kind not in METHOD_KINDS:
                raise ValueError(f"methods.{name}.kind: {m.kind!r} is not one of {', '.join(METHOD_KINDS)}")
            unknown = [d for d in m.order if d not in self.domains]
            if unknown:
                raise ValueError(f"methods.{name}.order: unknown domain(s) {unknown}")

    @property
    def root(self) -> Path:
        return Path(self.run.dir) / self.run.name

    @property
    def out(self) -> Path:
        return self.root / "compare"


def is_compare_plan(path: str | Path) -> bool:
    """A YAML whose composed top level has `methods` and `domains` is a comparison plan, not a job."""
    from rl.config_loader import ConfigError, load_yaml_tree

    try:
        data, _ = load_yaml_tree(path)
    except ConfigError:
        return False
    return "methods" in data and "domains" in data


def load_plan(path: str | Path, overrides: list[str] | None = None) -> ComparePlan:
    """Read, compose (`base:`), override and validate a comparison plan."""
    from rl.config_loader import apply_overrides, build_dataclass, load_yaml_tree

    data, provenance = load_yaml_tree(path)
    provenance.setdefault("", str(path))
    data = apply_overrides(data, list(overrides or []), provenance)
    _resolve_fragment_bases(data, provenance)
    return build_dataclass(ComparePlan, data, provenance)


def _resolve_fragment_bases(node: Any, provenance: dict[str, str], prefix: str = "") -> None:
    """`base:` inside a job fragment names a file relative to the plan file that declared it (as a job file's
    own `base:` is): made absolute here, so the written stage configs load from anywhere."""
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if key == "base" and prefix and value is not None:
            origin = provenance.get(dotted, "")
            folder = Path(origin).parent if origin and Path(origin).is_file() else Path.cwd()
            values = [value] if isinstance(value, str) else list(value)
            node[key] = [str((folder / v).resolve()) if not Path(v).is_absolute() else v for v in values]
        else:
            _resolve_fragment_bases(value, provenance, dotted + ".")
