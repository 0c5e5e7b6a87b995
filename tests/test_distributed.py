"""The sharded trainer on 2 CPU ranks (gloo), started the way users start it: `torchrun ... -m cli train` and the
Ray launcher. Each run is compared with a 1-rank run of the same config and global batch: per-step losses and
final weights equal to float tolerance, resume across world sizes continues as an uninterrupted run, the frozen
vision tower is bit-identical and has no optimizer state, and a rank that raises is reported by rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import job
from models.factory import load_model

ROOT = Path(__file__).resolve().parents[1]
# float32 on 2 ranks vs 1: the sum of two shards' gradients and the partition of rows into micro-batches change
# the order of additions only
RTOL, ATOL = 1e-4, 1e-5


def _env(extra_path: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    paths = [str(ROOT)] + ([str(extra_path)] if extra_path else []) + [env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


def train(config: Path, overrides: list[str], ranks: int = 1, extra_path: Path | None = None, timeout: float = 300):
    """`vlpost train` as a user runs it: plain, or under torchrun with `ranks` processes."""
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               "-m", "cli", "train", str(config), f"trainer.world_size={ranks}", "trainer.launcher=torchrun"]
    else:
        cmd = [sys.executable, "-m", "cli", "train", str(config)]
    return subprocess.run(cmd + overrides, cwd=ROOT, env=_env(extra_path), capture_output=True, text=True,
                          timeout=timeout)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a: Path, b: Path, key: str = "actor/loss") -> None:
    ra, rb = records(a), records(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        assert y[key] == pytest.approx(x[key], rel=RTOL, abs=ATOL), (x["step"], key)
    assert any(abs(r[key]) > 1e-4 for r in ra), "the runs compared did not train (zero loss throughout)"
    wa, wb = load_model(a / "final").state_dict(), load_model(b / "final").state_dict()
    start = load_model(a / "checkpoints" / "step_000000").state_dict()
    assert any(not torch.equal(start[k], wa[k]) for k in wa), "the runs compared did not change the weights"
    assert set(wa) == set(wb)
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=RTOL, atol=ATOL, msg=name)


def config_file(workspace: Path, name: str, extra: dict | None = None) -> Path:
    base = {"trainer": {"steps": 4, "checkpoint_every": 2, "keep_checkpoints": 0, "micro_batch_size": 3,
                        "eval_at_start": False, "eval_teachers": False}}
    for key, value in (extra or {}).items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    job(workspace, name, base)
    return workspace / f"{name}.yaml"


# A reward that varies within groups (the random tiny student earns nothing from the task rewards): GSPO's
# group-normalised advantages are then non-zero and the update moves the weights.
VARIED_REWARD = Path(__file__).with_name("varied_reward.py")
GSPO = {"teachers": [], "algorithm": {"advantage": "grpo", "policy_loss": "gspo", "updates_per_step": 2},
        "optim": {"lr": 1e-3, "schedule": "cosine", "warmup_steps": 1},
        "rewards": {"routes": {d: f"{VARIED_REWARD}:length_mod_three" for d in ("video", "retrieval", "tool", "reasoning")},
                    "num_workers": 0}}


@pytest.mark.parametrize("algorithm", ["mopd", "gspo"])
def test_two_torchrun_ranks_equal_one_rank(workspace, algorithm):
    extra = GSPO if algorithm == "gspo" else {"algorithm": {"logit_losses": {"teacher_fkl": 0.5}}, "teachers": [
        {"name": "vl", "path": str(workspace / "teacher_vl"), "domains": ["video"], "num_workers": 0, "topk": 4},
        {"name": "text", "path": str(workspace / "teacher_text"), "domains": ["retrieval", "tool", "reasoning"],
         "view": "text", "num_workers": 0, "topk": 4}]}
    one = config_file(workspace, f"{algorithm}_one", extra)
    two = config_file(workspace, f"{algorithm}_two", extra)
    for cfg, ranks in ((one, 1), (two, 2)):
        done = train(cfg, [], ranks)
        assert done.returncode == 0, done.stderr[-3000:]
    runs = workspace / "runs"
    assert_same_run(runs / f"{algorithm}_one", runs / f"{algorithm}_two")
    if algorithm == "mopd":
        assert all(r["mopd/teacher_fkl"] > 0 for r in records(runs / "mopd_two"))
    # the frozen tower: bit-identical after training, and no optimizer state in the sharded checkpoint
    before = load_model(runs / f"{algorithm}_two" / "checkpoints" / "step_000000").state_dict()
    after = load_model(runs / f"{algorithm}_two" / "final").state_dict()
    vision = [k for k in before if k.startswith("model.visual.")]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(runs / f"{algorithm}_two" / "final" / "dcp")).read_metadata().state_dict_metadata
    optim = [k for k in keys if k.startswith("optim.state.")]
    assert optim and not any(".visual." in k for k in optim)


# Resuming with `trainer.steps=2` then 4 emulates an interruption at step 2; a cosine schedule is a function of
# trainer.steps, so the resume tests keep the learning rate constant (after one warm-up step).
RESUMABLE = {**GSPO, "optim": {"lr": 1e-3, "schedule": "constant", "warmup_steps": 1}}


@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)])
def test_resume_on_another_world_size_continues_exactly(workspace, first, second):
    name = f"resume_{first}_{second}"
    straight = config_file(workspace, f"straight_{name}", RESUMABLE)
    resumed = config_file(workspace, name, RESUMABLE)
    assert train(straight, [], 1).returncode == 0
    done = train(resumed, ["trainer.steps=2"], first)
    assert done.returncode == 0, done.stderr[-3000:]
    done = train(resumed, [], second)  # the same run folder: resumes from step 2 on the other world size
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed" in done.stdout
    assert_same_run(workspace / "runs" / f"straight_{name}", workspace / "runs" / name)


def test_a_rank_that_raises_is_reported_by_rank_and_stops_the_job(workspace, tmp_path):
    """Rank 1 fails in its update: the job ends (no hang in a collective) and names the rank and the stage."""
    (tmp_path / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import rl.policy as p\n"
        "    def broken(self, *a, **k):\n"
        "        raise RuntimeError('injected failure')\n"
        "    p.PolicyWorker.update = broken\n")
    cfg = config_file(workspace, "failing", GSPO)
    done = train(cfg, [], 2, extra_path=tmp_path, timeout=240)
    assert done.returncode != 0
    assert "policy rank 1" in done.stderr and "failed while update" in done.stderr and "injected failure" in done.stderr


def test_ray_launcher_two_ranks_equal_one_rank(workspace):
    one = config_file(workspace, "ray_one", GSPO)
    two = config_file(workspace, "ray_two", GSPO)
    assert train(one, [], 1).returncode == 0
    done = train(two, ["trainer.world_size=2", "trainer.launcher=ray", "trainer.threads=1"], 1)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ray actors, FSDP2" in done.stdout  # the placement plan printed at start
    assert_same_run(workspace / "runs" / "ray_one", workspace / "runs" / "ray_two")


def test_check_prints_the_placement_and_refuses_a_cluster_too_small():
    from rl.config import load_config
    from rl.config_check import check_config
    from rl.placement import plan_placement

    path = ROOT / "configs" / "mopd_qwen3vl_30b_a3b.yaml"
    cfg, _ = load_config(path)
    plan = plan_placement(cfg)
    assert plan.role("trainer").workers == 16 and plan.gpus == 16 + 16 + 14
    problems, notes = check_config(cfg)
    assert not problems and any("placement (ray, training on cuda, 46 GPUs)" in n for n in notes)
    cfg, _ = load_config(path, ["cluster.gpus=40"])
    problems, _ = check_config(cfg)
    assert any("needs 46 GPUs but cluster.gpus is 40" in p for p in problems)
    cfg, _ = load_config(path, ["trainer.launcher=local"])
    assert any("'local' runs one rank" in p for p in check_config(cfg)[0])


def test_bf16_mixed_precision_on_one_rank_follows_float32(workspace):
    """The GPU path on the CPU: FSDP2 over a one-rank group with bf16 compute over fp32 master weights. Per-step
    losses follow the float32 run within bf16 tolerance (0.05 absolute on losses of order 1), the exported
    weights stay float32, and a resume continues the same run."""
    fp32 = config_file(workspace, "prec_fp32", GSPO)
    mixed = config_file(workspace, "prec_bf16", GSPO)
    assert train(fp32, [], 1).returncode == 0
    done = train(mixed, ["trainer.precision=bf16_mixed", "trainer.steps=2"], 1)
    assert done.returncode == 0, done.stderr[-3000:]
    done = train(mixed, ["trainer.precision=bf16_mixed"], 1)
    assert done.returncode == 0 and "resumed" in done.stdout, done.stderr[-3000:]
    a, b = records(workspace / "runs" / "prec_fp32"), records(workspace / "runs" / "prec_bf16")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert y["actor/loss"] == pytest.approx(x["actor/loss"], abs=0.05)
    weights = load_model(workspace / "runs" / "prec_bf16" / "final").state_dict()
    assert all(w.dtype == torch.float32 for w in weights.values() if w.is_floating_point())
    before = load_model(workspace / "runs" / "prec_fp32" / "final").state_dict()
    assert any(not torch.equal(before[k], weights[k]) for k in before)  # it is a different computation


def test_weight_sync_streams_buckets_and_marks_the_last(workspace):
    """The engines get the new weights in buckets of `trainer.weight_sync_mb`, the last one marked: together
    exactly the student's weights, each tensor once."""
    from rl.policy import PolicyWorker

    cfg, _ = job(workspace, "buckets", {"teachers": [], "algorithm": {"advantage": "grpo", "policy_loss": "grpo"}})
    worker = PolicyWorker(cfg)
    buckets = list(worker.weight_buckets(0.01))  # 10 KB: many buckets
    assert len(buckets) > 3
    names = [n for b in buckets for n in b]
    state = worker.lm.state_dict()
    assert sorted(names) == sorted(state) and len(names) == len(set(names))
    for b in buckets:
        for n, t in b.items():
            assert torch.equal(t, state[n]) and t.device.type == "cpu"
