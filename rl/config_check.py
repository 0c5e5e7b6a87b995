"""`check`: everything that can be validated without weights or data, so a cluster job fails here, not later."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from rl.algorithms import advantage_estimator_names, get_logit_loss, logit_loss_names, policy_loss_names
from rl.config import JobConfig


def check_config(cfg: JobConfig, require_files: bool = False) -> tuple[list[str], list[str]]:
    """(problems, notes). Problems make `check` fail; notes say what could not be verified here."""
    problems: list[str] = []
    notes: list[str] = []
    alg = cfg.algorithm
    if alg.advantage not in advantage_estimator_names():
        problems.append(f"algorithm.advantage: {alg.advantage!r} is not registered ({', '.join(advantage_estimator_names())})")
    if alg.policy_loss not in policy_loss_names():
        problems.append(f"algorithm.policy_loss: {alg.policy_loss!r} is not registered ({', '.join(policy_loss_names())})")
    if alg.mopd_topk and not all(t.topk >= alg.mopd_topk for t in cfg.teachers):
        problems.append(f"algorithm.mopd_topk={alg.mopd_topk} needs every teacher's topk >= {alg.mopd_topk}")
    known_logit_losses = logit_loss_names()
    without_topk = [t.name for t in cfg.teachers if t.topk <= 0]
    for name in alg.logit_losses:
        if name not in known_logit_losses:
            problems.append(f"algorithm.logit_losses.{name}: not a registered logit loss ({', '.join(known_logit_losses)})")
        elif get_logit_loss(name).needs_teacher_topk and (without_topk or not cfg.teachers):
            problems.append(f"algorithm.logit_losses.{name} needs teachers with topk > 0 "
                            f"(not: {without_topk or 'no teachers'})")

    from rl.placement import plan_placement, validate_placement

    problems.extend(f"placement: {p}" for p in validate_placement(cfg))
    notes.append(plan_placement(cfg).format())

    from rewards.registry import get_reward

    for domain, spec in cfg.rewards.routes.items():
        try:
            get_reward(spec)
        except Exception as err:  # noqa: BLE001 - report any failure to resolve, with its key
            problems.append(f"rewards.routes.{domain}: {err}")

    def need(path: str | None, key: str) -> None:
        if path is None or Path(path).exists():
            return
        if require_files:
            problems.append(f"{key}: {path} not found")
        else:
            notes.append(f"{key}: {path} not found here (fine for `check`; `train` needs it)")

    need(cfg.model.path, "model.path")
    need(cfg.model.vision_from, "model.vision_from")
    for i, t in enumerate(cfg.teachers):
        need(t.path, f"teachers.{i}.path ({t.name})")
    if cfg.model.tokenizer not in ("model", "embedded"):
        need(cfg.model.tokenizer, "model.tokenizer")

    problems.extend(_check_task_sources(cfg))
    train_domains = _static_domains(cfg.data.train)
    if cfg.teachers and train_domains:
        served = {d for t in cfg.teachers for d in t.domains}
        if "*" not in served:
            missing = sorted(train_domains - served)
            if missing:
                problems.append(f"teachers: no teacher serves training domain(s) {missing}")
    if train_domains:
        missing = sorted(d for d in train_domains if d not in cfg.rewards.routes)
        if missing:
            problems.append(f"rewards.routes: no reward for training domain(s) {missing}")

    from models.factory import inference_dtype

    engines = [("rollout.engine_args", cfg.rollout.backend, cfg.rollout.engine_args)] + [
        (f"teachers.{i}.engine_args", t.backend, t.engine_args) for i, t in enumerate(cfg.teachers)]
    for key, backend, args in engines:
        if backend == "hf" and "dtype" in args:
            try:  # the engines' own check, run before anything loads
                inference_dtype(args["dtype"], f"{key}.dtype")
            except ValueError as err:
                problems.append(str(err))

    backends = {cfg.rollout.backend} | {t.backend for t in cfg.teachers}
    if "vllm" in backends and importlib.util.find_spec("vllm") is None:
        notes.append("vLLM is not installed here: `pip install -e \".[vllm]\"` where the job runs")
    return problems, notes


def _check_task_sources(cfg: JobConfig) -> list[str]:
    """Each task source is registered and its arguments are ones it accepts (typos caught before any run)."""
    import inspect

    import tasks.embedded  # noqa: F401  (registers the built-in sources)
    from tasks.base import get_task_source

    try:
        import evals  # noqa: F401
        import tasks.embedded_video  # noqa: F401
    except ImportError:
        pass
    problems = []
    for split in ("train", "eval"):
        for i, task in enumerate(getattr(cfg.data, split)):
            key = f"data.{split}.{i}"
            try:
                factory = get_task_source(task.source)
            except KeyError as err:
                problems.append(f"{key}.source: {err.args[0]}")
                continue
            params = inspect.signature(factory).parameters
            if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
                target = getattr(factory, "__wrapped__", None) or _source_class(factory)
                params = inspect.signature(target).parameters if target is not None else params
            if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
                continue
            for arg in task.args:
                if arg not in params:
                    import difflib

                    close = difflib.get_close_matches(arg, list(params), n=1)
                    hint = f"; did you mean '{close[0]}'?" if close else f"; accepted: {', '.join(params)}"
                    problems.append(f"{key}.args.{arg}: not an argument of task source {task.source!r}{hint}")
    return problems


def _source_class(factory):
    """A factory function `def x_source(**kwargs): return XSource(**kwargs)` names its class in its annotation."""
    annotation = inspect_return(factory)
    return annotation if isinstance(annotation, type) else None


def inspect_return(factory):
    import typing

    try:
        return typing.get_type_hints(factory).get("return")
    except Exception:  # noqa: BLE001 - unresolvable annotations: no class to inspect
        return None


def _static_domains(tasks) -> set[str]:
    """Domains known from the config alone (embedded tasks list theirs); others are only known at run time."""
    domains: set[str] = set()
    for task in tasks:
        if task.source == "embedded":
            from tasks.embedded import DOMAINS

            domains.update(task.args.get("domains", DOMAINS))
        elif "domain" in task.args:
            domains.add(task.args["domain"])
    return domains
