"""End to end: a tiny model checkpoint (embedded-demo tokenizer) generates on the NIAH and BFCL adapters, the
official scorers report, and watch mode + the retention view run over the checkpoint folder."""

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("torch")
factory = pytest.importorskip("models.factory")
chat = pytest.importorskip("models.chat")
rollout_base = pytest.importorskip("rollout.base")
evaluation = pytest.importorskip("rl.evaluation")
embedded = pytest.importorskip("tasks.embedded")

from evals.bfcl import BFCLSource  # noqa: E402
from evals.niah import NIAHSource  # noqa: E402
from evals.retention import retention_report  # noqa: E402
from evals.score import format_table, score_generations  # noqa: E402
from evals.watch import watch  # noqa: E402

BFCL = Path(__file__).resolve().parents[2] / "shared" / "data" / "bfcl"


@pytest.mark.skipif(not BFCL.is_dir(), reason="shared BFCL files absent")
def test_checkpoint_evaluated_on_niah_and_bfcl(tmp_path):
    tok = embedded.embedded_tokenizer(tmp_path / "embedded")
    run = tmp_path / "run"
    staging = run / "checkpoints" / "step_000010.tmp"
    factory.save_model(factory.build_model(factory.TinyModelSpec(), tok, seed=0), tok, staging)
    os.rename(staging, run / "checkpoints" / "step_000010")

    reports = {}

    def evaluate_fn(checkpoint):
        model, tokenizer = factory.load_model(checkpoint), factory.load_tokenizer(checkpoint)
        renderer = chat.ChatRenderer(tokenizer, factory.vision_layout(model))
        settings = rollout_base.SamplingSettings(max_new_tokens=12, greedy=True)
        suites = {
            "niah": list(NIAHSource(tokenizer=tokenizer, lengths=[384, 768], depths=[0.0, 1.0])),
            "bfcl": list(BFCLSource(annotations=BFCL, categories=["simple_python", "irrelevance"], limit=2)),
        }
        domains = {}
        for name, samples in suites.items():
            completions = evaluation.generate_completions(model, renderer, samples, settings, batch_size=4)
            reports[name] = metrics = score_generations(name, samples, completions)
            if name == "niah":
                domains["retrieval"] = {"mean_reward": metrics["score"] / 100, "n": metrics["n"]}
            else:
                n = sum(metrics[c]["n"] for c in ("simple_python", "irrelevance"))
                acc = sum(metrics[c]["accuracy"] * metrics[c]["n"] for c in ("simple_python", "irrelevance")) / n
                domains["tool"] = {"mean_reward": acc / 100, "n": n}
        return {"domains": domains, "teachers": {"tool_teacher": {"tool": {"mean_reward": 0.8, "n": 4}}}}

    scored = watch(run, evaluate_fn, poll_s=0.01, stop_after=1)
    assert [r["step"] for r in scored] == [10]

    niah = reports["niah"]
    assert niah["n"] == 4 and set(niah["by_length"]) == {"384", "768"} and set(niah["by_depth"]) == {"0.0", "1.0"}
    assert 0.0 <= niah["score"] <= 100.0 and "length=768" in format_table(niah)
    bfcl = reports["bfcl"]
    assert bfcl["simple_python"]["n"] == 2 and bfcl["irrelevance"]["n"] == 2
    assert "simple_python" in format_table(bfcl)

    result = json.loads((run / "eval" / "000010.json").read_text())
    assert set(result["domains"]) == {"retrieval", "tool"}
    rows = retention_report(run)
    tool = next(r for r in rows if r["domain"] == "tool")
    assert tool["ratio"] == pytest.approx(result["domains"]["tool"]["mean_reward"] / 0.8)
    assert (run / "plots" / "retention.png").is_file()
