"""The fast cases of the fault-injection suite (`bench/fault_suite.py` runs them all, with 20 kill -9 moments):
kill -9 of `train` mid-checkpoint and mid-step, each followed by the same command, continues with the losses of
an uninterrupted run; a corrupted checkpoint is skipped for the previous one, said in the log; a reward that
hangs, returns NaN or a string, and a broken data line end in one named `error:` line, never a hang."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import fault_kit as kit  # noqa: E402
from cli.main import main  # noqa: E402
from conftest import run  # noqa: E402
from rl.config import load_config  # noqa: E402

STEPS = 4
NO_RAY = {"rollout": {"num_workers": 0}}


def config(workspace: Path, name: str, extra: dict | None = None, steps: int = STEPS) -> tuple[Path, Path]:
    cfg = kit.job_config(workspace, name, {**NO_RAY, **(extra or {})}, steps=steps, every=2)
    return kit.write_job(workspace, name, cfg), kit.run_dir(cfg)


@pytest.fixture(scope="module")
def reference(workspace) -> dict:
    """Per-step losses of the uninterrupted run, trained in this process."""
    path, run_dir = config(workspace, "reference")
    run(load_config(path))
    return kit.losses(run_dir)


def test_kill_9_mid_checkpoint_and_mid_step_then_the_same_command_continues_exactly(workspace, reference):
    path, run_dir = config(workspace, "killed")
    # 1: inside the step-2 save, manifest written, not yet renamed into place
    first = kit.train_and_kill(path, kit.KillWhen(log_text="test pause: checkpoint step 2 at manifest"),
                               env={kit.PAUSE_ENV: "2:manifest"})
    assert first.rc is None and "manifest" in first.killed_at
    assert kit.checkpoint_problems(run_dir) == []
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [".tmp_step_000002", "step_000000"]
    # 2: the same command, killed as soon as the step-4 checkpoint folder appears (mid-write)
    second = kit.train_and_kill(path, kit.KillWhen(watch=run_dir / "checkpoints", path_glob=".tmp_step_000004",
                                                   poll_s=0.001))
    assert second.rc is None and "resumed" in second.output and "from step_000000" in second.output
    assert kit.checkpoint_problems(run_dir) == [] and not (run_dir / "checkpoints" / "step_000004").exists()
    # 3: to the end
    last = kit.train(path, timeout_s=300)
    assert last.rc == 0, last.output[-2000:]
    assert "from step_000002" in last.output
    assert kit.loss_difference(reference, kit.losses(run_dir)) == 0.0
    assert kit.one_record_per_step(run_dir, STEPS) and kit.checkpoint_problems(run_dir) == []
    assert (run_dir / "final").resolve().name == "step_000004"
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]


def test_a_corrupted_checkpoint_is_skipped_for_the_previous_one_and_the_run_continues_exactly(workspace, reference):
    path, run_dir = config(workspace, "corrupted")
    run(load_config(path))
    shard = sorted((run_dir / "checkpoints" / "step_000004" / "dcp").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01
    shard.write_bytes(bytes(data))
    again = kit.train(path, timeout_s=300)
    assert again.rc == 0, again.output[-2000:]
    assert "step_000004 is unusable (dcp/" in again.output and "corrupted (digest differs)" in again.output
    assert "from step_000002" in again.output
    assert kit.loss_difference(reference, kit.losses(run_dir)) == 0.0 and kit.one_record_per_step(run_dir, STEPS)
    assert kit.checkpoint_problems(run_dir) == []


# ---------------------------------------------------------------------- bad inputs: one named error, no hang



def train_in_process(path: Path, capsys) -> tuple[int, list[str], str]:
    code = main(["train", str(path)])
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("error: ")], err


@pytest.mark.parametrize("fn,why", [
    ("hangs", "timed out after 1s (the reward call); worker killed"),
    ("nan", "returned non-finite value nan"),
    ("word", "returned str 'good', not a number"),
])
def test_a_bad_reward_ends_in_one_named_error(workspace, tmp_path, capsys, fn, why):
    plugin = tmp_path / "bad_rewards.py"
    plugin.write_text(kit.BAD_REWARDS)
    routes = {d: f"{plugin}:{fn}" for d in ("video", "retrieval", "tool", "reasoning")}
    path, _ = config(workspace, f"reward_{fn}", {"rewards": {"routes": routes, "num_workers": 1, "timeout_s": 1.0}},
                     steps=1)
    t0 = time.monotonic()
    code, errors, err = train_in_process(path, capsys)
    assert code == 1 and len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith(f"error: reward '{plugin}:{fn}' failed on sample ")
    assert why in errors[0]
    if fn == "hangs":  # the first timeout decides the batch: the other 7 samples are not waited for
        assert "other samples were not scored after it" in errors[0]
        assert time.monotonic() - t0 < 30


def test_a_broken_data_line_is_a_named_error_with_file_and_line(workspace, tmp_path, capsys):
    annotations = tmp_path / "clips.jsonl"
    annotations.write_text('{"video": "a.mp4", "query": "red", "window": [1, 3]}\n{"video": "b.mp4", "query\n')
    path, _ = config(workspace, "broken_line", {"data": {"train": [
        {"source": "video_files", "args": {"path": str(annotations)}}]}}, steps=1)
    code, errors, err = train_in_process(path, capsys)
    assert code == 1 and len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith(f"error: {path}: data.train.0.args: {annotations}:2: not JSON")


# ---------------------------------------------------------------------- checkpoint deletion is atomic


def test_a_delete_cut_short_never_leaves_a_half_deleted_checkpoint(tmp_path, monkeypatch):
    """Rotation (and re-saving a step) renames a folder out of `step_*` before deleting it: a kill mid-delete
    leaves a `.deleting_*` folder that no reader lists and the next save removes."""
    from rl import checkpoint

    def write(folder: Path) -> None:
        (folder / "weights.bin").write_bytes(b"x" * 1000)
        (folder / "more.bin").write_bytes(b"y" * 1000)

    for step in (0, 2, 4):
        checkpoint.save_checkpoint(tmp_path, step, write, {"step": step}, keep=2)
    real_rmtree = shutil.rmtree

    def killed_mid_delete(path, *args, **kwargs):  # deletes one file, then the process "dies"
        next(p for p in Path(path).rglob("*.bin")).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_mid_delete)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(tmp_path, 6, write, {"step": 6}, keep=2)  # rotation drops step 2
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [0, 4, 6]
    assert all(checkpoint.verify_checkpoint(p) is None for _, p in checkpoint.list_checkpoints(tmp_path))
    checkpoint.save_checkpoint(tmp_path, 8, write, {"step": 8}, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000000", "step_000006",
                                                                            "step_000008"]


# ---------------------------------------------------------------------- the 20-kill sweep (slow)


@pytest.mark.slow
def test_twenty_kill_9_moments_all_resume_exactly(tmp_path):
    from bench import fault_suite

    out = tmp_path / "summary.md"
    assert fault_suite.main(["--only", "kills", "--workspace", str(tmp_path / "ws"), "--out", str(out)]) == 0
    assert "20/20 resumes continue exactly" in out.read_text()
