"""The learning-rate schedule counts optimizer updates: with `updates_per_step` updates a step, warm-up and cosine
span `trainer.steps x updates_per_step` updates, so the 30B config's cosine ends at step 500, not 125."""

from __future__ import annotations

import json
import math

import pytest

from conftest import job, run
from rl.config import load_config
from rl.schedule import lr_factor, schedule_for


def test_the_30b_config_trains_until_its_last_step():
    cfg, _ = load_config("configs/mopd_qwen3vl_30b_a3b.yaml")
    total, warm, schedule = schedule_for(cfg)
    assert (total, warm, schedule) == (500 * 4, 10 * 4, "cosine")
    at_step = lambda step: lr_factor(step * 4 - 1, total, warm, schedule)  # noqa: E731 - last update of a step
    assert at_step(125) > 0.8 and at_step(250) == pytest.approx(0.5 * (1 + math.cos(math.pi * (999 - 40) / 1960)))
    assert 0 < at_step(499) < 1e-4 and at_step(500) == pytest.approx(0.0, abs=1e-6)


def test_a_run_logs_the_scheduled_rate_of_each_steps_last_update(workspace):
    trainer = run(job(workspace, "schedule", {
        "teachers": [], "algorithm": {"advantage": "grpo", "policy_loss": "grpo", "updates_per_step": 2},
        "optim": {"lr": 1e-3, "schedule": "cosine", "warmup_steps": 1},
        "trainer": {"steps": 4, "eval_at_start": False, "eval_teachers": False}}))
    logged = [json.loads(x)["optim/lr"] for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    # 8 updates, 2 of warm-up: the cosine runs over updates 2..7; the rate of update u is 1e-3 * factor(u)
    expected = [1e-3 * lr_factor(2 * s - 1, 8, 2, "cosine") for s in range(1, 5)]
    assert logged == pytest.approx(expected, rel=1e-6)
    assert logged[0] == pytest.approx(1e-3) and 0 < logged[3] < logged[2] < logged[1] < 1e-3
    assert trainer.policy.worker.scheduler.last_epoch == 8  # the optimizer's own scheduler took 8 updates
