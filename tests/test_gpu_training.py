"""The policy worker on a CUDA GPU (skipped without one): bf16 mixed precision against the float32 CPU run, the
DSA stage through the Triton kernels, and a whole MOPD job under torchrun against the same job on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import job
from test_distributed import ROOT, _env, config_file, records

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def step_rollouts(trainer_cfg):
    """One real step's record (generated, rewarded, teacher-scored on the CPU) to feed both workers."""
    from rl.trainer import Trainer

    trainer = Trainer(*trainer_cfg)
    try:
        prompts = trainer.stream.next_batch(trainer.cfg.data.prompts_per_step)
        rollouts = trainer._generate(prompts)
        trainer._score_rewards(rollouts)
        trainer._score_teachers(rollouts)
        trainer.policy.logprobs(rollouts)
        from rl.algorithms import token_loss_mask

        token_loss_mask(rollouts, trainer.cfg.algorithm, sampled=True)
        rollouts.advantages = trainer.estimator(rollouts.rewards, rollouts.group_ids, rollouts.loss_mask,
                                                trainer.cfg.algorithm, rollouts=rollouts)
        return rollouts
    finally:
        trainer.close()


def test_bf16_mixed_on_cuda_follows_float32_on_cpu(workspace):
    from rl.policy import PolicyWorker

    cpu_cfg = job(workspace, "gpu_vs_cpu", {"trainer": {"device": "cpu", "eval_at_start": False}})
    rollouts = step_rollouts(cpu_cfg)
    cfg = cpu_cfg[0]
    cpu = PolicyWorker(cfg)
    cfg.trainer.device, cfg.trainer.precision = "cuda", "bf16_mixed"
    gpu = PolicyWorker(cfg)
    assert gpu.mixed and gpu.device.type == "cuda"
    a, b = cpu.logprobs(rollouts), gpu.logprobs(rollouts)
    mask = rollouts.response_mask.cpu().bool()
    # bf16 compute: log-probs within 0.1 nats of float32 (values of -2 to -9 on a 6k vocabulary)
    assert (a.old - b.old)[mask].abs().max() < 0.1
    ma, mb = cpu.update(rollouts, 0), gpu.update(rollouts, 0)
    assert mb["actor/loss"] == pytest.approx(ma["actor/loss"], abs=2e-2)
    before = {k: v.clone() for k, v in cpu.lm.state_dict().items() if ".visual." in f".{k}"}
    after = {}
    for bucket in gpu.weight_buckets(1):
        after.update(bucket)
    assert before and all(torch.equal(after[k], before[k].cpu()) for k in before)  # frozen tower untouched
    assert all(after[k].dtype == torch.float32 for k in after)  # fp32 master weights


def test_dsa_sparse_stage_trains_through_the_triton_kernels(workspace, monkeypatch):
    import models.dsa.kernels as kernels
    from rl.policy import PolicyWorker

    calls = []
    original = kernels.sparse_attention
    monkeypatch.setattr(kernels, "sparse_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    cfg_pair = job(workspace, "gpu_dsa", {
        "model": {"path": str(workspace / "student"), "tokenizer": "model",
                  "dsa": {"enabled": True, "topk": 8, "index_heads": 2, "index_head_dim": 16, "stage": "sparse"}},
        "teachers": [], "rollout": {"backend": "reference", "num_workers": 0, "group_size": 1},
        "algorithm": {"advantage": "sft", "policy_loss": "nll", "mismatch": "none"},
        "trainer": {"device": "cpu", "micro_batch_size": 1, "eval_at_start": False},
    })
    rollouts = step_rollouts(cfg_pair)
    cfg = cfg_pair[0]
    cfg.trainer.device = "cuda"
    worker = PolicyWorker(cfg)
    indexer = {n: p.detach().clone() for n, p in worker.lm.named_parameters() if ".indexer." in n}
    metrics = worker.update(rollouts, 0)
    assert calls, "the sparse attention kernel was not used on CUDA"
    assert metrics["dsa/indexer_kl"] > 0
    changed = [n for n, p in worker.lm.named_parameters() if n in indexer and not torch.equal(p.detach(), indexer[n])]
    assert changed


def test_mopd_job_under_torchrun_on_cuda_follows_the_cpu_run(workspace):
    """The tiny MOPD job (teachers included) with the student on CUDA under torchrun runs to the end; its per-step
    losses follow the float32 CPU run of the same config within bf16 tolerance (0.05 absolute: losses of ~1).
    Rollouts and teachers stay on the CPU in both runs, so both sample from the same generator."""
    extra = {"algorithm": {"logit_losses": {"teacher_fkl": 0.5}}, "teachers": [
        {"name": "vl", "path": str(workspace / "teacher_vl"), "domains": ["video"], "num_workers": 0, "topk": 4},
        {"name": "text", "path": str(workspace / "teacher_text"), "domains": ["retrieval", "tool", "reasoning"],
         "view": "text", "num_workers": 0, "topk": 4}]}
    cfg = config_file(workspace, "gpu_mopd", extra)
    base = [sys.executable, "-m", "cli", "train", str(cfg)]
    cpu = subprocess.run(base + ["run.name=gpu_mopd_cpu", "trainer.device=cpu"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert cpu.returncode == 0, cpu.stderr[-3000:]
    gpu = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                          "-m", "cli", "train", str(cfg), "run.name=gpu_mopd_cuda", "trainer.device=cuda",
                          "trainer.launcher=torchrun"],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert gpu.returncode == 0, gpu.stderr[-3000:]
    a, b = records(workspace / "runs" / "gpu_mopd_cpu"), records(workspace / "runs" / "gpu_mopd_cuda")
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert y["actor/loss"] == pytest.approx(x["actor/loss"], abs=0.05)
        assert y["mopd/teacher_fkl"] == pytest.approx(x["mopd/teacher_fkl"], rel=0.05)
    print(json.dumps({"cpu": [r["actor/loss"] for r in a], "cuda": [r["actor/loss"] for r in b]}))
