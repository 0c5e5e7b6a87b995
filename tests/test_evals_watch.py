"""Watch mode (each checkpoint scored once, restart-safe) and the retention table / JSON / PNG."""

import json
import os

import pytest

from evals.retention import format_retention, plot_retention, retention_report, retention_table
from evals.watch import list_checkpoints, load_results, watch


def make_checkpoint(run, step):
    tmp = run / "checkpoints" / f".tmp_step_{step:06d}"
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text("{}")
    os.rename(tmp, run / "checkpoints" / f"step_{step:06d}")  # atomic, as the trainer writes them


def fake_eval(calls):
    def evaluate(path):
        calls.append(path.name)
        step = int(path.name.split("_")[1])
        return {"domains": {"video": {"mean_reward": step / 1000, "n": 8}},
                "teachers": {"t_video": {"video": {"mean_reward": 0.4, "n": 8}}}}
    return evaluate


def test_watch_scores_each_checkpoint_once_and_resumes(tmp_path):
    run = tmp_path / "run"
    make_checkpoint(run, 100)
    make_checkpoint(run, 200)
    (run / "checkpoints" / "step_000300.tmp").mkdir()  # still being written: never read
    calls = []
    scored = watch(run, fake_eval(calls), poll_s=0.01, stop_after=2)
    assert calls == ["step_000100", "step_000200"] and [r["step"] for r in scored] == [100, 200]
    assert json.loads((run / "eval" / "000100.json").read_text())["checkpoint"].endswith("step_000100")
    # restart: nothing re-scored, new checkpoint picked up
    make_checkpoint(run, 300)
    scored = watch(run, fake_eval(calls), poll_s=0.01, max_idle_s=0.05)
    assert calls == ["step_000100", "step_000200", "step_000300"] and [r["step"] for r in scored] == [300]
    video = json.loads((run / "eval" / "summary.json").read_text())["domains"]["video"]
    assert (video["before_step"], video["after_step"], video["student_before"]) == (100, 300, 0.1)
    assert video["teachers"] == {"t_video": 0.4} and video["retention"] == pytest.approx(0.3 / 0.4)


def test_separate_results_dir_and_rotated_checkpoints(tmp_path):
    run = tmp_path / "run"
    make_checkpoint(run, 100)
    calls, logs = [], []

    def evaluate(path):
        (run / "checkpoints" / "step_000200").rename(run / "gone")  # rotated away while 100 is being scored
        return fake_eval(calls)(path)

    make_checkpoint(run, 200)
    scored = watch(run, evaluate, poll_s=0.01, max_idle_s=0.03, results_dir="eval_bench", log=logs.append)
    assert [r["step"] for r in scored] == [100] and calls == ["step_000100"]
    assert any("removed before it could be scored" in line for line in logs)
    assert (run / "eval_bench" / "000100.json").is_file() and not (run / "eval").exists()


def test_a_result_written_before_a_crash_is_not_scored_again(tmp_path):
    run = tmp_path / "run"
    make_checkpoint(run, 100)
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "000100.json").write_text(json.dumps({"step": 100, "domains": {}}))  # state file never updated
    calls = []
    assert watch(run, fake_eval(calls), poll_s=0.01, max_idle_s=0.03) == [] and calls == []
    assert [s for s, _ in list_checkpoints(run)] == [100] and load_results(run)[0]["step"] == 100


def test_retention_rows_ratios_table_json_and_png(tmp_path):
    results = [
        {"step": 200, "domains": {"video": {"mean_reward": 0.3, "n": 4}, "math": {"mean_reward": 0.5, "n": 4}}},
        {"step": 100, "domains": {"video": {"mean_reward": 0.2, "n": 4}, "code": {"mean_reward": 0.1, "n": 4}}},
    ]
    teachers = {"t_video": {"video": {"mean_reward": 0.4}}, "t_math": {"math": 0.8, "video": 0.6}}
    rows = retention_table(results, teachers)
    assert [(r["step"], r["domain"], r["teacher"]) for r in rows] == [
        (100, "code", None), (100, "video", "t_math"), (100, "video", "t_video"),
        (200, "math", "t_math"), (200, "video", "t_math"), (200, "video", "t_video")]
    assert rows[2]["ratio"] == pytest.approx(0.5) and rows[3]["ratio"] == pytest.approx(0.625)
    assert rows[0]["ratio"] is None
    table = format_retention(rows)
    assert "62.5%" in table and "student/teacher" in table
    png = plot_retention(rows, tmp_path / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_retention_report_reads_a_watched_run(tmp_path):
    run = tmp_path / "run"
    for step in (100, 200):
        make_checkpoint(run, step)
    watch(run, fake_eval([]), poll_s=0.01, stop_after=2)
    rows = retention_report(run)  # teacher scores from each result's "teachers"
    assert [r["ratio"] for r in rows] == [pytest.approx(0.25), pytest.approx(0.5)]
    assert json.loads((run / "eval" / "retention.json").read_text())["rows"][1]["step"] == 200
    assert (run / "plots" / "retention.png").is_file()
