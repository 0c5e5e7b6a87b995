"""`vlpost eval` and the trainer share one evaluator: file-backed video tasks are decoded, rewards see the same
prompt as in training, an all-unusable eval set is an error; `--watch` survives rotation and ends with the run;
every error leaves through one exit path."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from cli.main import main
from conftest import job, run
from test_embedded_video import write_clip

REPO = Path(__file__).resolve().parents[1]
MARKER = "Which"


@pytest.fixture(scope="module")
def trained(workspace, tmp_path_factory):
    """A 2-step GRPO run whose reward reads only the prompt: 1 when it mentions MARKER."""
    folder = tmp_path_factory.mktemp("prompt_reward")
    plugin = folder / "prompt_reward.py"
    plugin.write_text(f"def mentions(completion, reference, prompt):\n    return float({MARKER!r} in prompt)\n")
    routes = {d: f"{plugin}:mentions" for d in ("video", "retrieval", "tool", "reasoning")}
    trainer = run(job(workspace, "shared_eval", {
        "teachers": [], "algorithm": {"advantage": "grpo", "policy_loss": "grpo"},
        "rewards": {"routes": routes, "num_workers": 0},
        "trainer": {"steps": 2, "eval_teachers": False, "checkpoint_every": 1},
    }))
    return trainer


def _mentions(sample) -> bool:
    """MARKER in any text of the prompt, read straight from the messages (not through the project's helpers)."""
    texts = [m["content"] if isinstance(m["content"], str) else " ".join(
        p["text"] for p in m["content"] if p["type"] == "text") for m in sample.messages]
    return any(MARKER in t for t in texts)


def test_rewards_see_the_prompt_in_evaluation_as_in_training(trained, tmp_path):
    by_domain: dict[str, list[bool]] = {}
    for s in trained.eval_samples:
        by_domain.setdefault(s.domain, []).append(_mentions(s))
    expected = {d: sum(v) / len(v) for d, v in by_domain.items()}
    assert expected["retrieval"] == 1.0 and expected["tool"] == 0.0  # a prompt of "" would score 0 everywhere
    in_loop = json.loads((trained.run_dir / "eval" / "000002.json").read_text())["domains"]
    assert {d: e["mean_reward"] for d, e in in_loop.items()} == pytest.approx(expected)
    out = tmp_path / "cli.json"
    assert main(["eval", str(trained.run_dir / "checkpoints" / "step_000002"), "--out", str(out)]) == 0
    cli = json.loads(out.read_text())["domains"]
    assert {d: e["mean_reward"] for d, e in cli.items()} == pytest.approx(expected)


def _video_config(trained, tmp_path: Path, lines: list[dict]) -> Path:
    (tmp_path / "clips").mkdir(exist_ok=True)
    write_clip(tmp_path / "clips" / "a.mp4")
    jsonl = tmp_path / "clips.jsonl"
    jsonl.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    cfg = yaml.safe_load((trained.run_dir / "config.yaml").read_text())
    cfg["data"]["eval"] = [{"source": "video_files", "args": {"path": str(jsonl)}, "weight": 1.0}]
    cfg["rewards"]["routes"] = {"video": "temporal_iou"}
    path = tmp_path / "video_eval.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_eval_decodes_file_backed_video_tasks(trained, tmp_path, capsys):
    config = _video_config(trained, tmp_path, [
        {"id": "a1", "video": "clips/a.mp4", "query": "the screen turns red", "window": [1, 3]},
        {"id": "a2", "video": "clips/a.mp4", "query": "red?", "window": [1, 2], "duration": 4},
        {"id": "gone", "video": "clips/missing.mp4", "query": "anything", "window": [0, 1]},
    ])
    out = tmp_path / "video.json"
    rc = main(["eval", str(trained.run_dir / "final"), "--config", str(config), "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    video = json.loads(out.read_text())["domains"]["video"]
    assert video["n"] == 2 and "grounding" in video  # the missing clip is skipped and reported
    assert "skipped 1 of 3 samples with unusable videos" in capsys.readouterr().out


def test_an_eval_set_with_no_usable_video_is_an_error(trained, tmp_path, capsys):
    config = _video_config(trained, tmp_path, [{"video": "clips/missing.mp4", "query": "q", "window": [0, 1]}])
    rc = main(["eval", str(trained.run_dir / "final"), "--config", str(config), "--out", str(tmp_path / "x.json")])
    err = capsys.readouterr().err
    assert rc == 1 and "error: no held-out sample is usable: all 1 videos failed to decode" in err
    assert "Traceback" not in err and not (tmp_path / "x.json").exists()


def test_watch_ends_with_the_run_and_survives_rotation(trained, tmp_path, capsys):
    """A copy of the run where the trainer's rotation deletes each checkpoint as soon as it is loaded."""
    copy = tmp_path / "run"
    shutil.copytree(trained.run_dir, copy, symlinks=True)
    shutil.rmtree(copy / "eval")
    shutil.rmtree(copy / "checkpoints" / "step_000000")
    from rl import eval_cli

    real = eval_cli.load_model

    def load_then_rotate(path, *args, **kwargs):
        model = real(path, *args, **kwargs)
        if Path(path).name == "step_000001":
            shutil.rmtree(path)  # rotation strikes while step 1 is being scored
            raise FileNotFoundError(f"No such file or directory: {path}/model.safetensors")
        return model

    done = threading.Event()
    result: list[int] = []

    def watch_it():
        result.append(main(["eval", str(copy), "--watch", "--poll", "0.05"]))
        done.set()

    eval_cli.load_model, original = load_then_rotate, eval_cli.load_model
    try:
        thread = threading.Thread(target=watch_it, daemon=True)
        thread.start()
        assert done.wait(120), "eval --watch did not exit although the run has ended (final -> last step)"
    finally:
        eval_cli.load_model = original
    out = capsys.readouterr().out
    assert result == [0]
    assert "step_000001 was removed while it was being scored" in out
    assert "checkpoint(s) of step 0 were rotated away before this watcher saw them" in out
    assert "the run has ended" in out
    assert json.loads((copy / "eval" / "000002.json").read_text())["step"] == 2


def test_ctrl_c_and_errors_leave_through_one_exit_path(monkeypatch, capsys, tmp_path):
    from rl import eval_cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(eval_cli, "run_eval", interrupted)
    assert main(["eval", "anything"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "interrupted"
    monkeypatch.undo()
    assert main(["eval", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "nope not found" in err
    job_file = tmp_path / "j.yaml"
    job_file.write_text("trainer: {steps: 0}\n")
    assert main(["check", str(job_file)]) == 1  # a config error: was exit code 2, other errors 1
    assert main(["check", str(job_file), "--traceback"]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_a_reward_module_that_blocks_at_import_does_not_hang_check(tmp_path):
    (tmp_path / "stuck.py").write_text("import time\ntime.sleep(3600)\ndef r(completion, reference):\n    return 1.0\n")
    job_file = tmp_path / "j.yaml"
    job_file.write_text(yaml.safe_dump({"algorithm": {"advantage": "grpo", "policy_loss": "grpo"},
                                        "rewards": {"routes": {"reasoning": f"{tmp_path}/stuck.py:r"},
                                                    "load_timeout_s": 1}}))
    proc = subprocess.run([sys.executable, "-m", "cli", "check", str(job_file)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "timed out after 1s" in proc.stderr, proc.stderr
