"""A run folder belongs to one run: a fresh run is refused on another run's folder, a resume under another config is
refused with the keys named, a resumed run keeps one metrics record per step, and a truncated or corrupted
checkpoint is detected and the previous complete one used (said in the log)."""

from __future__ import annotations

import json

import pytest

from conftest import job, run
from rl.checkpoint import latest_checkpoint, verify_checkpoint
from rl.run_dir import RunFolderError

FAST = {"teachers": [], "algorithm": {"advantage": "grpo", "policy_loss": "grpo"},
        "trainer": {"steps": 4, "checkpoint_every": 2, "eval_at_start": False, "eval_teachers": False,
                    "keep_checkpoints": 0}}


def steps_logged(run_dir) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_fresh_run_never_writes_into_another_runs_folder(workspace):
    first = run(job(workspace, "taken", FAST, ["trainer.steps=2"]))
    before = sorted(p.name for p in (first.run_dir / "checkpoints").iterdir())
    with pytest.raises(RunFolderError, match="already holds a run and run.resume is false"):
        run(job(workspace, "taken", FAST, ["run.resume=false"]))
    assert sorted(p.name for p in (first.run_dir / "checkpoints").iterdir()) == before
    assert steps_logged(first.run_dir) == [1, 2]


def test_resuming_under_another_config_is_refused_unless_allowed(workspace):
    run(job(workspace, "changed", FAST, ["trainer.steps=2"]))
    with pytest.raises(RunFolderError, match=r"optim.lr.*differ"):
        run(job(workspace, "changed", FAST, ["optim.lr=0.5"]))
    resumed = run(job(workspace, "changed", FAST, ["optim.lr=0.5", "run.allow_config_change=true"]))
    assert steps_logged(resumed.run_dir) == [1, 2, 3, 4]


def test_a_key_added_since_the_run_was_recorded_is_not_a_change(workspace):
    """A run recorded by an older version lacks keys added since; at their defaults they change nothing (a
    resume goes on), set to anything else they are a change like any other."""
    import yaml

    first = run(job(workspace, "older", FAST, ["trainer.steps=2"]))
    saved = first.run_dir / "config.yaml"
    record = yaml.safe_load(saved.read_text())
    del record["model"]["attention"], record["trainer"]["packing"]  # what a run of an earlier version wrote
    saved.write_text(yaml.safe_dump(record, sort_keys=False))
    with pytest.raises(RunFolderError, match=r"model.attention"):
        run(job(workspace, "older", FAST, ["model.attention=eager"]))
    resumed = run(job(workspace, "older", FAST))
    assert steps_logged(resumed.run_dir) == [1, 2, 3, 4]


def test_a_resumed_run_keeps_one_record_per_step(workspace):
    """Steps 3-4 ran, but the run was cut before their checkpoint: the resumed run repeats them, once."""
    first = run(job(workspace, "repeat", FAST, ["trainer.checkpoint_every=2"]))
    import shutil

    shutil.rmtree(first.run_dir / "checkpoints" / "step_000004")  # as if killed before the step-4 checkpoint
    with (first.run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "actor/lo')  # and a record cut short by the kill
    again = run(job(workspace, "repeat", FAST))
    assert steps_logged(again.run_dir) == [1, 2, 3, 4]


@pytest.mark.parametrize("damage", ["truncate", "corrupt", "no_manifest"])
def test_a_damaged_checkpoint_is_skipped_for_the_previous_one(workspace, damage, capsys):
    trainer = run(job(workspace, f"damaged_{damage}", FAST))
    newest = trainer.run_dir / "checkpoints" / "step_000004"
    weights = newest / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "corrupt":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    else:
        (newest / "manifest.json").unlink()
    assert verify_checkpoint(newest) is not None
    assert latest_checkpoint(trainer.run_dir) == trainer.run_dir / "checkpoints" / "step_000002"
    assert "step_000004 is unusable" in capsys.readouterr().out
    resumed = run(job(workspace, f"damaged_{damage}", FAST, ["trainer.steps=6"]))
    assert "resumed" in capsys.readouterr().out
    assert steps_logged(resumed.run_dir) == [1, 2, 3, 4, 5, 6]
    assert (resumed.run_dir / "final").resolve().name == "step_000006"


def test_a_relative_reward_file_is_relative_to_the_config_that_names_it(tmp_path, monkeypatch):
    from rl.config import load_config
    from rewards.registry import get_reward

    folder = tmp_path / "jobs"
    (folder / "plugins").mkdir(parents=True)
    (folder / "plugins" / "mine.py").write_text("def half(completion, reference, **meta):\n    return 0.5\n")
    (folder / "job.yaml").write_text("algorithm: {advantage: grpo, policy_loss: grpo}\nrewards:\n  routes:\n    reasoning: plugins/mine.py:half\n"
                                     "    tool: [{reward: plugins/mine.py:half, weight: 1.0}]\n")
    monkeypatch.chdir(tmp_path)  # the working directory is not the config's folder
    cfg, _ = load_config(folder / "job.yaml")
    assert cfg.rewards.routes["reasoning"] == f"{folder / 'plugins' / 'mine.py'}:half"
    assert cfg.rewards.routes["tool"][0]["reward"] == f"{folder / 'plugins' / 'mine.py'}:half"
    get_reward(cfg.rewards.routes["reasoning"])  # resolvable from here
    cfg, _ = load_config(folder / "job.yaml", ["rewards.routes.reasoning=jobs/plugins/mine.py:half"])
    assert cfg.rewards.routes["reasoning"] == "jobs/plugins/mine.py:half"  # the command line: the working dir
