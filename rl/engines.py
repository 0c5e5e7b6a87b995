"""The worker groups a job's controller drives, each started where the placement plan puts it: the policy ranks,
the rollout engines, the teachers (with their routing), and the evaluation engine.

    plan    = plan_placement(cfg)            rl/placement.py
    bundles = ray_bundles(plan)              one Ray placement group for every GPU role
    policy  = start_policy(cfg, plan, bundles)
    rollout = start_rollouts(cfg, model_path, bundles)
    router, teachers = start_teachers(cfg, bundles, domains, tokenizer)
    evaluation = start_eval_engine(cfg, model_path, device)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rl.placement import PlacementPlan, evaluation_engine
from rl.worker_group import PolicyGroup
from teachers.backends import teacher_backend_target
from teachers.routing import Route, TeacherRouter


def uses_ray(plan: PlacementPlan) -> bool:
    """Ray is needed for Ray training ranks or for any role hosted in actors."""
    return plan.launcher == "ray" or any(r.workers for r in plan.roles if r.name != "trainer")


def start_policy(cfg, plan: PlacementPlan, bundles: dict[str, list]) -> PolicyGroup:
    """The training ranks the plan asks for: one in-process rank, rank 0 of a torchrun job, or Ray actors."""
    from rl.worker_group import LocalPolicyGroup, RayPolicyGroup, TorchrunPolicyGroup, init_torchrun_group

    if plan.launcher == "torchrun":
        rank, world, local = init_torchrun_group(cfg)
        return TorchrunPolicyGroup(cfg, rank, world, local)
    if plan.launcher == "ray":
        return RayPolicyGroup(cfg, bundles.get("trainer"), plan.role("trainer").gpus_per_worker)
    return LocalPolicyGroup(cfg)


def start_rollouts(cfg, model_path: Path, bundles: dict[str, list]):
    """The rollout engines (`rollout.*`), loaded from the student's latest export."""
    from rollout.actors import ActorPool

    r = cfg.rollout
    kwargs = {"model_path": str(model_path), "batch_size": r.batch_size, **r.engine_args}
    return ActorPool("rollout", "rollout.worker:RolloutWorker", {"backend": r.backend, "engine_kwargs": kwargs},
                     num_workers=r.num_workers, threads=r.threads_per_worker, gpus_per_worker=r.gpus_per_worker,
                     ray_address=r.ray_address, bundles=bundles.get("rollout"))


def start_teachers(cfg, bundles: dict[str, list], domains: list[str], tokenizer) -> tuple[TeacherRouter | None, dict]:
    """One pool per teacher and the router over them; every training domain must be served, and every teacher
    must share the student's vocabulary (token-level distillation scores the student's own token ids)."""
    if not cfg.teachers:
        return None, {}
    from rollout.actors import ActorPool

    routes, pools = [], {}
    for t in cfg.teachers:
        if not Path(t.path).exists():
            raise FileNotFoundError(f"teachers.{t.name}.path: {t.path} not found")
        routes.append(Route(t.name, tuple(t.domains), tuple(t.modalities), t.weight))
        kwargs = {"name": t.name, "path": t.path, "view": t.view, "topk": t.topk, "batch_size": t.batch_size,
                  "template_kwargs": t.template_kwargs, **t.engine_args}
        pools[t.name] = ActorPool(
            f"teacher {t.name}", teacher_backend_target(t.backend), kwargs, num_workers=t.num_workers,
            threads=t.threads_per_worker, gpus_per_worker=t.gpus_per_worker, ray_address=cfg.rollout.ray_address,
            bundles=bundles.get(f"teacher:{t.name}"))
    router = TeacherRouter(routes)
    if router.uncovered(domains):
        raise ValueError(f"teachers: no teacher serves domain(s) {router.uncovered(domains)}")
    check_teacher_vocab(cfg, tokenizer)
    return router, pools


def check_teacher_vocab(cfg, tokenizer) -> None:
    from models.factory import load_tokenizer

    mine = hash(tuple(sorted(tokenizer.get_vocab().items())))
    for t in cfg.teachers:
        if hash(tuple(sorted(load_tokenizer(t.path).get_vocab().items()))) != mine:
            raise ValueError(f"teacher {t.name!r} ({t.path}) has a different vocabulary from the student: "
                             "token-level distillation needs shared token ids")


def start_eval_engine(cfg, model_path: Path, device: Any):
    """The engine held-out answers come from, holding the student's synced weights (`eval.engine`): None when
    the rollout engines evaluate."""
    if evaluation_engine(cfg) == "rollout":
        return None
    from rollout.hf_engine import HFEngine

    return HFEngine(model_path=str(model_path), batch_size=cfg.eval.batch_size, device=str(device))
