"""One place for bounds and cross-field rules (the loader and `JobConfig.validate`), so `check`, `train` and the
demo agree; `vlpost keys` lists list-item keys; `check` understands the demo plan."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from cli.main import main
from rl.config import JobConfig, TaskConfig, TeacherConfig, load_config
from rl.config_check import check_config
from rl.config_loader import ConfigError

REPO = Path(__file__).resolve().parents[1]
GRPO = {"algorithm": {"advantage": "grpo", "policy_loss": "grpo"}}


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_keys_lists_every_list_item_key(capsys):
    assert main(["keys"]) == 0
    keys = {line.split("`")[1] for line in capsys.readouterr().out.splitlines() if line.startswith("| `")}
    expected = {f"teachers[].{f.name}" for f in dataclasses.fields(TeacherConfig)}
    expected |= {f"data.{split}[].{f.name}" for split in ("train", "eval") for f in dataclasses.fields(TaskConfig)}
    assert len(expected) == 20 and expected <= keys
    assert "rollout.engine_args.sleep_level (vllm)" in keys and "algorithm.adv_eps" in keys


def test_check_understands_the_demo_plan(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    assert main(["check", "configs/demo.yaml"]) == 0
    assert "configs/demo.yaml: OK" in capsys.readouterr().out
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"stages": ["configs/teacher_tool_tiny.yaml", "configs/nope.yaml"]}))
    assert main(["check", str(plan)]) == 1
    assert "stage config(s) not found" in capsys.readouterr().err
    plan.write_text(yaml.safe_dump({"stages": ["configs/mopd_tiny.yaml"], "stagess": []}))
    assert main(["check", str(plan)]) == 1
    assert "unknown key 'stagess'; did you mean 'stages'?" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("trainer.steps=0", "key 'trainer.steps': must be >= 1, got 0"),
    ("trainer.steps=-5", "key 'trainer.steps': must be >= 1, got -5"),
    ("data.prompts_per_step=0", "key 'data.prompts_per_step': must be >= 1, got 0"),
    ("rollout.max_new_tokens=0", "key 'rollout.max_new_tokens': must be >= 1, got 0"),
    ("optim.lr=-1e-4", "key 'optim.lr': must be >= 0, got -0.0001"),
    ("rewards.timeout_s=0", "key 'rewards.timeout_s': must be > 0, got 0.0"),
    ("optim.betas=[0.9,-0.1]", "key 'optim.betas': must be >= 0, got -0.1"),
    ("data.train.0.weight=0", "key 'data.train.0.weight': must be > 0, got 0.0"),
])
def test_numbers_are_bounded_where_declared(tmp_path, capsys, override, message):
    job = write(tmp_path, {**GRPO, "data": {"train": [{"source": "embedded"}]}})
    with pytest.raises(ConfigError, match="^command line: " + message.replace("[", r"\[").replace(".", r"\.")):
        load_config(job, [override])
    assert main(["check", str(job), override]) == 1  # `check` and `train` load through the same rules
    assert message in capsys.readouterr().err


def test_filtering_zero_variance_groups_needs_groups(tmp_path):
    job = write(tmp_path, {**GRPO, "algorithm": {**GRPO["algorithm"], "filter_zero_variance_groups": True},
                           "rollout": {"group_size": 1}})
    with pytest.raises(ConfigError, match="filter_zero_variance_groups needs rollout.group_size >= 2"):
        load_config(job)
    with pytest.raises(ConfigError, match="'grpo' normalises rewards within a group"):
        load_config(write(tmp_path, {**GRPO, "rollout": {"group_size": 1}}))
    assert load_config(job, ["rollout.group_size=2"])[0].rollout.group_size == 2
    # the same rule reaches a config built in code, through `check`
    cfg = JobConfig()
    cfg.algorithm.advantage, cfg.algorithm.filter_zero_variance_groups, cfg.rollout.group_size = "grpo", True, 1
    assert any("filter_zero_variance_groups" in p for p in check_config(cfg)[0])


def test_the_rule_matches_what_the_mask_would_do():
    """Independent of the rule's text: with one response per group, group std is 0 for every group, so the
    filter would keep nothing (what `_build_loss_mask` computes)."""
    import torch

    from rl.algorithms import group_stats

    _, std, _ = group_stats(torch.tensor([0.3, 0.9, 0.1]), torch.arange(3))
    assert (std > 0).sum() == 0


def test_a_broken_video_files_line_fails_check_with_file_and_line(tmp_path, capsys):
    jsonl = tmp_path / "clips.jsonl"
    jsonl.write_text(json.dumps({"video": "a.mp4", "query": "q", "window": [1, 2]}) + "\n{not json\n")
    job = write(tmp_path, {**GRPO, "data": {"train": [{"source": "video_files", "args": {"path": str(jsonl)}}]},
                           "rewards": {"routes": {"video": "temporal_iou"}}})
    assert main(["check", str(job)]) == 1
    assert f"data.train.0.args: {jsonl}:2: not JSON" in capsys.readouterr().err


def test_template_kwargs_typo_is_refused_when_the_template_is_at_hand(tmp_path, qwen3_tokenizer):
    folder = tmp_path / "tok"
    qwen3_tokenizer.save_pretrained(folder)
    job = write(tmp_path, {**GRPO, "model": {"path": str(folder), "template_kwargs": {"enable_thinkng": False}}})
    problems, _ = check_config(load_config(job)[0])
    assert any("model.template_kwargs.enable_thinkng" in p and "did you mean 'model.template_kwargs.enable_thinking'"
               in p for p in problems)
    ok = write(tmp_path, {**GRPO, "model": {"path": str(folder), "template_kwargs": {"enable_thinking": False}}})
    assert not [p for p in check_config(load_config(ok)[0])[0] if "template_kwargs" in p]
