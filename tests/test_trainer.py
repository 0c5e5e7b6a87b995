"""The training loop end to end on a tiny student: frozen vision, exact resume, bad samples, routing to
teachers in their views, and the run's files (resolved config, atomic checkpoints, eval summary, plot)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import mopd  # noqa: F401  (registers the mopd estimator)
from conftest import job, run
from models.factory import load_model

def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["actor/loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_mopd_run_freezes_vision_and_writes_run_files(workspace):
    trainer = run(job(workspace, "mopd"))
    run_dir = trainer.run_dir
    before = load_model(run_dir / "checkpoints" / "step_000000").state_dict()
    after = load_model(run_dir / "final").state_dict()
    vision = [k for k in before if ".visual." in f".{k}"]
    assert vision, "the student should have a vision tower"
    for key in vision:
        assert torch.equal(before[key], after[key]), f"frozen weight {key} changed"
    changed = [k for k in before if k not in vision and not torch.equal(before[k], after[k])]
    assert changed, "the language model should have been updated"
    # frozen parameters carry no optimizer state
    worker = trainer.policy.worker
    with_state = worker.optimizer_state_names()
    trainable = [n for n, p in worker.module.named_parameters() if p.requires_grad]
    assert sorted(with_state) == sorted(trainable) and len(trainable) < len(list(worker.module.parameters()))
    assert not any(".visual." in n for n in with_state)
    # the run's files
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["rollout"]["group_size"] == 2 and resolved["teachers"][1]["view"] == "text"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step_000000", "step_000002", "step_000004"]
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert set(summary["domains"]) == {"video", "retrieval", "tool", "reasoning"}
    for row in summary["domains"].values():
        assert {"student_before", "student_after", "teacher", "n"} <= set(row)
    assert (run_dir / "plots" / "heldout_reward.png").stat().st_size > 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all("mopd/reverse_kl" in r for r in records)
    assert any("mopd/reverse_kl/video" in r for r in records) and any("mopd/reverse_kl/tool" in r for r in records)


def test_resume_continues_exactly(workspace):
    straight = run(job(workspace, "straight"))
    first = run(job(workspace, "resumed", overrides=["trainer.steps=2"]))
    assert len(losses(first.run_dir)) == 2
    second = run(job(workspace, "resumed"))  # same run folder: resumes from step 2
    expected, got = losses(straight.run_dir), losses(second.run_dir)
    assert len(got) == 4
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    a = load_model(straight.run_dir / "final").state_dict()
    b = load_model(second.run_dir / "final").state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_bad_answers_get_zero_and_are_counted(workspace):
    """A random student writes unparsable intervals, bad tool JSON and empty answers: reward 0, counted."""
    trainer = run(job(workspace, "grpo_bad", {"teachers": [], "algorithm": {"advantage": "grpo", "policy_loss": "grpo"},
                                              "trainer": {"steps": 2, "eval_teachers": False}}))
    records = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["reward/invalid_frac"] > 0 for r in records)
    assert all(r["reward/mean"] == pytest.approx(0.0, abs=0.51) for r in records)


def test_user_reward_plugin_from_a_file_drives_a_training_run(workspace, tmp_path):
    """A TRL-signature reward named in YAML as `path/file.py:function` is loaded in the reward workers and used."""
    plugin = tmp_path / "my_rewards.py"
    plugin.write_text(
        "def quarter_per_char(prompts, completions, **kwargs):\n"
        "    return [0.25 if len(c) % 2 == 0 else 0.75 for c in completions]\n"
    )
    routes = {d: f"{plugin}:quarter_per_char" for d in ("video", "retrieval", "tool", "reasoning")}
    trainer = run(job(workspace, "plugin", {
        "teachers": [], "algorithm": {"advantage": "grpo", "policy_loss": "grpo"},
        "rewards": {"routes": routes, "num_workers": 1},
        "trainer": {"steps": 2, "eval_teachers": False, "eval_at_start": False},
    }))
    records = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        sixteenths = record["reward/mean"] * 16  # 8 responses scoring 0.25 or 0.75 each
        assert abs(sixteenths - round(sixteenths)) < 1e-9 and 4 <= round(sixteenths) <= 12
        assert record["reward/invalid_frac"] == 0.0
    summary = json.loads((trainer.run_dir / "eval" / "summary.json").read_text())
    assert all(0.25 <= row["student_after"] <= 0.75 for row in summary["domains"].values())


def test_lora_updates_only_adapted_projections_and_saves_merged_weights(workspace):
    trainer = run(job(workspace, "lora", {
        "model": {"path": str(workspace / "student"), "tokenizer": "model",
                  "lora": {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
        "optim": {"lr": 1e-2},
        "trainer": {"steps": 2, "eval_teachers": False, "eval_at_start": False, "checkpoint_every": 0},
    }))
    trainable = [n for n, p in trainer.policy.worker.lm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    before = load_model(trainer.run_dir / "checkpoints" / "step_000000").state_dict()
    after = load_model(trainer.run_dir / "final").state_dict()  # a plain HF folder: LoRA merged in
    assert set(before) == set(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    assert not any(".visual." in f".{k}" for k in changed)
    assert (trainer.run_dir / "final" / "adapter" / "adapter_config.json").exists()


@pytest.mark.parametrize("stage,checkpointing", [("dense_warmup", "off"), ("sparse", "off"), ("dense_warmup", "on"),
                                                   ("sparse", "on")])
def test_dsa_indexer_stages_train_what_they_should(workspace, stage, checkpointing):
    """Warm-up moves only the indexers; the sparse stage moves indexers and language model; vision never. With
    activation checkpointing (on by default on GPU) the recomputed forward runs in the same stage as the first."""
    trainer = run(job(workspace, f"dsa_{stage}_{checkpointing}", {
        "model": {"path": str(workspace / "student"), "tokenizer": "model",
                  "dsa": {"enabled": True, "topk": 8, "index_heads": 2, "index_head_dim": 16, "stage": stage}},
        # supervised on demonstrations, so the language model always has a gradient in the sparse stage
        "teachers": [], "rollout": {"backend": "reference", "num_workers": 0, "group_size": 1},
        "algorithm": {"advantage": "sft", "policy_loss": "nll", "mismatch": "none"},
        "optim": {"lr": 1e-2},
        "trainer": {"steps": 2, "eval_teachers": False, "eval_at_start": False, "checkpoint_every": 0,
                    "activation_checkpointing": checkpointing},
    }))
    records = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["dsa/indexer_kl"] > 0 for r in records)
    before = load_model(trainer.run_dir / "checkpoints" / "step_000000").state_dict()
    after = load_model(trainer.run_dir / "final").state_dict()  # reloads as a DSA model, indexers included
    indexer = {k for k in after if ".indexer." in k}
    assert indexer and indexer <= set(before)
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed & indexer
    assert not any(".visual." in f".{k}" for k in changed)
    if stage == "dense_warmup":
        assert changed <= indexer
    else:
        assert changed - indexer


@pytest.mark.parametrize("logit_agg", ["token_mean", "seq_mean_token_mean"])
def test_micro_batches_add_up_to_one_batch(workspace, logit_agg):
    """Gradient accumulation over micro-batches of 3 sequences equals one micro-batch of the whole step (per-step
    losses and the dense teacher KL term), since every term is weighted by its share of the step's units: tokens
    for the dense term by default, sequences under `algorithm.logit_loss_agg: seq_mean_token_mean`."""
    dense = {"algorithm": {"advantage": "mopd", "policy_loss": "gspo_token", "logit_losses": {"teacher_kl": 0.5},
                           "logit_loss_agg": logit_agg},
             "teachers": [
                 {"name": "vl", "path": str(workspace / "teacher_vl"), "domains": ["video"], "num_workers": 0, "topk": 4},
                 {"name": "text", "path": str(workspace / "teacher_text"), "domains": ["retrieval", "tool", "reasoning"],
                  "view": "text", "num_workers": 0, "topk": 4}]}
    split = run(job(workspace, f"split_micro_{logit_agg}", dense, ["trainer.steps=2", "trainer.micro_batch_size=3"]))
    whole = run(job(workspace, f"whole_micro_{logit_agg}", dense, ["trainer.steps=2", "trainer.micro_batch_size=64"]))
    def records(r):
        return [json.loads(x) for x in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(records(split), records(whole)):
        assert b["actor/loss"] == pytest.approx(a["actor/loss"], rel=1e-4, abs=1e-5)
        assert b["mopd/teacher_kl"] == pytest.approx(a["mopd/teacher_kl"], rel=1e-4)
        assert b["mopd/teacher_kl"] > 0
    a = load_model(split.run_dir / "final").state_dict()
    b = load_model(whole.run_dir / "final").state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_vision_from_starts_the_students_tower_from_another_model_and_keeps_it_frozen(workspace):
    """`model.vision_from`: the student's vision tensors become the source's (then frozen, bit-identical after
    training); its language model is untouched; a source without the same tower is an error naming the key."""
    from models.factory import load_model
    from models.vision_init import load_vision_from

    source = load_model(workspace / "teacher_vl").state_dict()
    student = load_model(workspace / "student").state_dict()
    trainer = run(job(workspace, "vision_from", {"model": {"vision_from": str(workspace / "teacher_vl")},
                                                 "trainer": {"steps": 1, "eval_at_start": False}}))
    after = trainer.policy.worker.lm.state_dict()
    vision = [k for k in source if k.startswith("model.visual.")]
    assert vision and all(torch.equal(after[k], source[k]) for k in vision)
    lm = [k for k in student if k.startswith("model.language_model.embed")]
    assert lm and not torch.equal(student[lm[0]], source[lm[0]])  # the two models differ...
    with pytest.raises(ValueError, match="model.vision_from"):  # ...and a text-only model has no tower to give
        load_vision_from(load_model(workspace / "student"), workspace / "teacher_text")
