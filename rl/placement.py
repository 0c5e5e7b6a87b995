"""One placement plan: every role of a job (training ranks, rollout engines, teachers, reference model,
evaluation) with its processes and devices, printed at start and checked against the declared cluster.

With Ray, the GPU roles share one placement group whose bundles are laid out in the plan's order (training ranks
first, then rollout engines, then teachers), so which GPUs train, which generate and which serve teachers is read
off the plan, not decided by each pool on its own. Roles without GPUs run in the controller's process or as
CPU actors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass
class Role:
    name: str  # "trainer", "rollout", "teacher:<name>", "reference", "evaluation"
    workers: int  # processes or actors; 0 = inside the controller's process
    gpus_per_worker: float
    where: str  # how it runs: "in-process", "ray actors", "torchrun ranks", "with the trainer ranks", ...

    @property
    def gpus(self) -> float:
        return self.workers * self.gpus_per_worker


@dataclass
class PlacementPlan:
    launcher: str  # "local", "torchrun" or "ray"
    device: str  # the training ranks' device type
    roles: list[Role]

    @property
    def gpus(self) -> float:
        """GPUs the job asks for (roles placed with another role add none)."""
        return sum(r.gpus for r in self.roles)

    def role(self, name: str) -> Role:
        return next(r for r in self.roles if r.name == name)

    def format(self) -> str:
        lines = [f"placement ({self.launcher}, training on {self.device}, {self.gpus:g} GPUs):"]
        for r in self.roles:
            count = f"{r.workers} x {r.gpus_per_worker:g} GPU" if r.workers and r.gpus_per_worker else (
                f"{r.workers} worker(s)" if r.workers else "controller process")
            lines.append(f"  {r.name:<30} {count:<22} {r.where}")
        return "\n".join(lines)


def resolve_launcher(cfg) -> str:
    """`trainer.launcher`: 'auto' is torchrun inside a torchrun job, Ray for several ranks, else one local rank."""
    launcher = cfg.trainer.launcher
    if launcher != "auto":
        return launcher
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return "torchrun"
    return "ray" if cfg.trainer.world_size > 1 else "local"


def training_device(cfg) -> str:
    """'cuda' or 'cpu': 'auto' is CUDA where torch sees one, or where the config declares a GPU cluster."""
    if cfg.trainer.device != "auto":
        return cfg.trainer.device
    import torch

    return "cuda" if torch.cuda.is_available() or cfg.cluster.gpus > 0 else "cpu"


def plan_placement(cfg) -> PlacementPlan:
    launcher = resolve_launcher(cfg)
    device = training_device(cfg)
    gpus = cfg.trainer.gpus_per_rank if device == "cuda" else 0.0
    trainer_where = {"local": "in-process", "torchrun": "torchrun ranks", "ray": "ray actors"}[launcher]
    roles = [Role("trainer", cfg.trainer.world_size if launcher != "local" else 1, gpus,
                  f"{trainer_where}, FSDP2" if cfg.trainer.world_size > 1 else trainer_where)]
    r = cfg.rollout
    if r.backend != "reference":
        roles.append(Role("rollout", r.num_workers, r.gpus_per_worker if r.num_workers else 0.0,
                          f"{r.backend} engines, " + ("ray actors" if r.num_workers else "in-process")))
    for t in cfg.teachers:
        roles.append(Role(f"teacher:{t.name}", t.num_workers, t.gpus_per_worker if t.num_workers else 0.0,
                          f"{t.backend}, " + ("ray actors" if t.num_workers else "in-process")))
    if cfg.algorithm.kl_coef > 0:
        roles.append(Role("reference", 0, 0.0, "with the trainer ranks (sharded like the student)"))
    roles.append(Role("evaluation", 0, 0.0, evaluation_where(cfg)))
    return PlacementPlan(launcher, device, roles)


def evaluation_where(cfg) -> str:
    engine = evaluation_engine(cfg)
    return "the rollout engines (synced weights)" if engine == "rollout" else (
        "an hf engine in the controller process (synced weights)")


def evaluation_engine(cfg) -> str:
    """`eval.engine`: 'auto' evaluates on the rollout engines when they are vLLM (the real setting: no second copy
    of the student), else on an hf engine in the controller's process."""
    if cfg.eval.engine != "auto":
        return cfg.eval.engine
    return "rollout" if cfg.rollout.backend == "vllm" else "hf"


def validate_placement(cfg) -> list[str]:
    """Problems with the plan against the declared cluster (`cluster.gpus`, 0 = undeclared) and the launcher."""
    problems = []
    plan = plan_placement(cfg)
    if cfg.cluster.gpus and plan.gpus > cfg.cluster.gpus:
        problems.append(f"placement needs {plan.gpus:g} GPUs but cluster.gpus is {cfg.cluster.gpus}:\n{plan.format()}")
    if plan.launcher == "local" and cfg.trainer.world_size > 1:
        problems.append("trainer.launcher 'local' runs one rank: use 'ray' or 'torchrun' for trainer.world_size > 1")
    if plan.launcher == "torchrun" and any(r.workers for r in plan.roles if r.name != "trainer"):
        problems.append("under torchrun the rollout engines and teachers run in rank 0's process: "
                        "set rollout.num_workers=0 and teachers[].num_workers=0 (or use trainer.launcher=ray)")
    if evaluation_engine(cfg) == "rollout" and cfg.rollout.backend == "reference":
        problems.append("eval.engine 'rollout' needs a generating rollout backend (not 'reference')")
    return problems


def ray_bundles(plan: PlacementPlan) -> dict[str, list[tuple[Any, int]]]:
    """One Ray placement group holding every GPU role's bundles in the plan's order; role -> [(group, index)]."""
    gpu_roles = [r for r in plan.roles if r.workers and r.gpus_per_worker > 0 and
                 not (r.name == "trainer" and plan.launcher != "ray")]
    if not gpu_roles:
        return {}
    from ray.util.placement_group import placement_group

    import ray

    specs = [{"GPU": r.gpus_per_worker, "CPU": 1} for r in gpu_roles for _ in range(r.workers)]
    group = placement_group(specs, strategy="PACK")
    ray.get(group.ready())
    out, index = {}, 0
    for r in gpu_roles:
        out[r.name] = [(group, index + i) for i in range(r.workers)]
        index += r.workers
    return out
