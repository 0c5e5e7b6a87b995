"""`check`: everything that can be validated without weights or data, so a cluster job fails here, not later."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from rl.algorithms import advantage_estimator_names, policy_loss_names
from rl.config import JobConfig, cross_field_problems


def check_config(cfg: JobConfig, require_files: bool = False) -> tuple[list[str], list[str]]:
    """(problems, notes). Problems make `check` fail; notes say what could not be verified here."""
    problems: list[str] = list(cross_field_problems(cfg))  # raised already by `load_config`; not by JobConfig()
    notes: list[str] = []
    for key, name, names in (("algorithm.advantage", cfg.algorithm.advantage, advantage_estimator_names()),
                             ("algorithm.policy_loss", cfg.algorithm.policy_loss, policy_loss_names())):
        if name not in names:
            problems.append(f"{key}: {name!r} is not registered ({', '.join(names)})")

    from rl.placement import plan_placement, validate_placement

    problems.extend(f"placement: {p}" for p in validate_placement(cfg))
    notes.append(plan_placement(cfg).format())

    from rewards.registry import get_reward
    from rewards.timeouts import call_with_timeout

    for domain, spec in cfg.rewards.routes.items():
        try:  # importing a user's module may block: bounded like every other reward call
            call_with_timeout(lambda spec=spec: get_reward(spec), cfg.rewards.load_timeout_s,
                              f"loading reward {spec!r:.80}")
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

    problems.extend(_check_template_kwargs(cfg))

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
            target = factory
            if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
                target = getattr(factory, "__wrapped__", None) or _source_class(factory) or factory
                params = inspect.signature(target).parameters
            static_check = getattr(target, "check_args", None)
            if static_check is not None:  # the source's own cheap validation (annotation files, no decoding)
                try:
                    static_check(**task.args)
                except (ValueError, OSError, TypeError) as err:
                    problems.append(f"{key}.args: {err}")
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


def _check_template_kwargs(cfg: JobConfig) -> list[str]:
    """`template_kwargs` keys are variables of a chat template: refused when the template (read from the
    tokenizer folder, no weights) never reads them. Skipped where the folder is absent (a note elsewhere)."""
    from models.templates import template_variables

    owners = [("model.template_kwargs", cfg.model.template_kwargs,
               cfg.model.path if cfg.model.tokenizer == "model" else cfg.model.tokenizer)]
    owners += [(f"teachers.{i}.template_kwargs", t.template_kwargs, t.path) for i, t in enumerate(cfg.teachers)]
    problems = []
    for key, kwargs, folder in owners:
        if not kwargs or folder in (None, "embedded") or not Path(folder).is_dir():
            continue
        variables = template_variables(folder)
        if variables is None:
            continue
        import difflib

        for name in kwargs:
            if name not in variables:
                close = difflib.get_close_matches(name, sorted(variables), n=1, cutoff=0.5)
                hint = f"; did you mean '{key}.{close[0]}'?" if close else ""
                problems.append(f"{key}.{name}: the chat template of {folder} never reads {name!r}{hint}")
    return problems
