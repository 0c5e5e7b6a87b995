"""What counts in the loss (`rl.algorithms.token_loss_mask`), for the options the shipped configs set: truncated
responses dropped or down-weighted, zero-variance groups filtered, the sampler/trainer mismatch as truncated
importance weights or a band mask; and a run's cadence (eval_every, checkpoint pruning) end to end."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from conftest import job, run
from rl.algorithms import token_loss_mask
from rl.config import AlgorithmConfig


def record(old, sampler, rewards, groups, truncated, mask=None):
    old, sampler = torch.tensor(old), torch.tensor(sampler)
    return SimpleNamespace(
        response_mask=torch.ones_like(old) if mask is None else torch.tensor(mask), old_logprobs=old,
        sampler_logprobs=sampler, rewards=torch.tensor(rewards), group_ids=torch.tensor(groups),
        truncated=torch.tensor(truncated), metrics={}, loss_mask=None, token_weights=None)


def alg(**kw) -> AlgorithmConfig:
    return AlgorithmConfig(**{"mismatch": "none", **kw})


def test_truncated_responses_are_dropped_or_downweighted():
    r = record([[0.0, 0.0]] * 3, [[0.0, 0.0]] * 3, [1.0, 0.0, 1.0], [0, 0, 1], [False, True, False])
    token_loss_mask(r, alg(truncated="drop"), sampled=True)
    assert r.loss_mask.tolist() == [[1, 1], [0, 0], [1, 1]]
    token_loss_mask(r, alg(truncated="downweight", truncated_weight=0.25), sampled=True)
    assert r.loss_mask.tolist() == [[1, 1], [0.25, 0.25], [1, 1]]
    token_loss_mask(r, alg(truncated="keep"), sampled=True)
    assert r.loss_mask.tolist() == [[1, 1]] * 3


def test_groups_with_equal_rewards_leave_the_loss():
    r = record([[0.0]] * 4, [[0.0]] * 4, [1.0, 1.0, 0.0, 1.0], [0, 0, 1, 1], [False] * 4)
    token_loss_mask(r, alg(filter_zero_variance_groups=True), sampled=True)
    assert r.loss_mask.tolist() == [[0], [0], [1], [1]]
    assert r.metrics["filter/zero_variance_frac"] == pytest.approx(0.5)


def test_mismatch_tis_weights_and_band_mask():
    # pi_old / pi_sampler per token: e^1, e^-1, 1.5, 0.3
    old = [[1.0, -1.0, math.log(1.5), math.log(0.3)]]
    r = record(old, [[0.0] * 4], [1.0], [0], [False])
    token_loss_mask(r, alg(mismatch="tis", mismatch_cap=2.0), sampled=True)
    assert r.token_weights[0].tolist() == pytest.approx([2.0, math.exp(-1), 1.5, 0.3])
    assert r.loss_mask.tolist() == [[1, 1, 1, 1]]
    r = record(old, [[0.0] * 4], [1.0], [0], [False])
    token_loss_mask(r, alg(mismatch="mask", mismatch_low=0.5, mismatch_high=2.0), sampled=True)
    assert r.loss_mask.tolist() == [[0, 0, 1, 0]] and r.metrics["mismatch/masked_frac"] == pytest.approx(0.75)
    assert r.metrics["mismatch/max_abs_logprob_diff"] == pytest.approx(abs(math.log(0.3)))
    r = record(old, [[0.0] * 4], [1.0], [0], [False])
    token_loss_mask(r, alg(mismatch="mask"), sampled=False)  # demonstrations: no sampler to compare with
    assert r.loss_mask.tolist() == [[1, 1, 1, 1]] and r.token_weights is None


def test_eval_every_and_checkpoint_pruning(workspace):
    trainer = run(job(workspace, "cadence", {
        "teachers": [], "algorithm": {"advantage": "grpo", "policy_loss": "grpo"},
        "trainer": {"steps": 6, "checkpoint_every": 2, "keep_checkpoints": 1, "eval_every": 3,
                    "eval_at_start": True, "eval_teachers": False}}))
    evals = sorted(p.name for p in (trainer.run_dir / "eval").glob("0*.json"))
    assert evals == ["000000.json", "000003.json", "000006.json"]
    # step 0 (the "before") and the newest one are kept; every step that was saved was complete
    assert sorted(p.name for p in (trainer.run_dir / "checkpoints").iterdir()) == ["step_000000", "step_000006"]
    summary = json.loads((trainer.run_dir / "eval" / "summary.json").read_text())
    assert summary["domains"]
