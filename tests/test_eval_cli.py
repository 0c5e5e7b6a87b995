"""`eval` on a checkpoint, on a whole run (retention table), and through benchmark adapters (NIAH, BFCL)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli.main import main
from conftest import job, run

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def trained_run(workspace):
    return run(job(workspace, "evalcli", {"trainer": {"steps": 2, "eval_teachers": True}})).run_dir


def test_eval_one_checkpoint_writes_per_domain_json(trained_run, capsys):
    checkpoint = trained_run / "checkpoints" / "step_000002"
    out = trained_run / "one.json"
    assert main(["eval", str(checkpoint), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["step"] == 2
    assert set(result["domains"]) == {"video", "retrieval", "tool", "reasoning"}
    assert all(entry["n"] == 4 for entry in result["domains"].values())
    assert "grounding" in result["domains"]["video"]  # R1@0.3/0.5/0.7 and mIoU for the IoU-scored task
    assert "domain" in capsys.readouterr().out


def test_eval_run_dir_scores_every_checkpoint_once_and_writes_retention(trained_run, capsys):
    before = {p.name: p.stat().st_mtime for p in (trained_run / "eval").glob("0*.json")}
    assert main(["eval", str(trained_run)]) == 0
    after = {p.name: p.stat().st_mtime for p in (trained_run / "eval").glob("0*.json")}
    assert {"000000.json", "000002.json"} <= set(after)
    assert all(after[name] == before[name] for name in before)  # the trainer's results are not scored again
    retention = json.loads((trained_run / "eval" / "retention.json").read_text())["rows"]
    assert {row["domain"] for row in retention} == {"video", "retrieval", "tool", "reasoning"}
    assert (trained_run / "plots" / "retention.png").stat().st_size > 0
    assert "ratio" in capsys.readouterr().out.lower() or retention


def test_eval_benchmarks_niah_and_bfcl_end_to_end(trained_run):
    checkpoint = trained_run / "final"
    niah = trained_run / "niah.json"
    assert main(["eval", str(checkpoint), "--benchmark", "niah", "--arg", "lengths=[256]", "--arg", "depths=[0,1]",
                 "--out", str(niah)]) == 0
    metrics = json.loads(niah.read_text())["metrics"]
    assert json.dumps(metrics)  # per length / depth report, scores low for a 2-step model
    if not (SHARED / "bfcl").exists():
        pytest.skip("shared BFCL files not present")
    bfcl = trained_run / "bfcl.json"
    assert main(["eval", str(checkpoint), "--benchmark", "bfcl", "--annotations", str(SHARED / "bfcl"),
                 "--arg", "categories=[simple_python,irrelevance]", "--limit", "2", "--out", str(bfcl)]) == 0
    result = json.loads(bfcl.read_text())["metrics"]
    assert set(result) >= {"simple_python", "irrelevance"} or "categories" in result
