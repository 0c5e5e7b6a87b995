"""`score` entry points: CLI table + JSON, bad input exit status, scoring model text through the same scorers."""

import json
from pathlib import Path

import pytest

from evals import charades, qvhighlights, trivial
from evals.score import format_table, main, score, score_generations

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
QVH = DATA / "qvhighlights" / "highlight_val_release.jsonl"
CHARADES = DATA / "charades_sta" / "charades_sta_test.txt"


@pytest.mark.skipif(not CHARADES.is_file(), reason="shared Charades-STA files absent")
def test_cli_prints_table_and_writes_json(tmp_path, capsys):
    preds = tmp_path / "whole.jsonl"
    assert trivial.main(["--benchmark", "charades_sta", "--annotations", str(CHARADES), "--predictor", "whole",
                         "--out", str(preds)]) == 0
    out = tmp_path / "m.json"
    assert main(["--benchmark", "charades", "--predictions", str(preds), "--annotations", str(CHARADES),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads(out.read_text())
    assert metrics["benchmark"] == "charades_sta" and metrics["n"] == 3720
    assert f"{metrics['llm_timelens']['mIoU']:.2f}" in printed and "2d_tan (IoU>t)" in printed
    # the whole video has IoU = gt length / video length with every ground truth
    anns = charades.load_annotations(CHARADES)
    expected = 100 * sum((a["window"][1] - a["window"][0]) / a["duration"] for a in anns) / len(anns)
    assert metrics["llm_timelens"]["mIoU"] == round(expected, 2)


def test_cli_bad_input_exits_2_naming_the_line(tmp_path, capsys):
    anno = tmp_path / "a.txt"
    anno.write_text("AAA 0.0 10.0##x.\n")
    (tmp_path / "Charades_v1_test.csv").write_text("id,length\nAAA,30\n")
    preds = tmp_path / "p.jsonl"
    preds.write_text('{"pred_windows": [[5, 1]]}\n')
    assert main(["--benchmark", "charades_sta", "--predictions", str(preds), "--annotations", str(anno)]) == 2
    assert "p.jsonl:1: pred_windows[0] has start 5.0 > end 1.0" in capsys.readouterr().err
    assert main(["--benchmark", "kinetics", "--predictions", str(preds), "--annotations", str(anno)]) == 2
    assert "unknown benchmark 'kinetics'" in capsys.readouterr().err


@pytest.mark.skipif(not QVH.is_file(), reason="shared QVHighlights annotations absent")
def test_qvhighlights_generations_go_through_the_official_scorer():
    samples = list(qvhighlights.QVHighlightsSource(annotations=QVH, limit=20))
    single = [s for s in samples if len(s.reference["relevant_windows"]) == 1]
    texts = [f"{s.reference['relevant_windows'][0][0]} - {s.reference['relevant_windows'][0][1]}" for s in single]
    m = score_generations("qvhighlights", single, texts)
    assert m["brief"]["MR-full-R1@0.7"] == 100.0 and m["brief"]["MR-full-mAP"] == 100.0
    assert m["n"] == len(single) and "HL-min-Fair-mAP" in m["brief"]
    empty = score_generations("qvhighlights", single, ["I cannot tell."] * len(single))
    assert empty["brief"]["MR-full-R1@0.5"] == 0.0 and empty["brief"]["HL-min-Fair-Hit1"] == 0.0
    assert "MR-full-mAP" in format_table(m)


@pytest.mark.skipif(not CHARADES.is_file(), reason="shared Charades-STA files absent")
def test_charades_generations_parse_model_text():
    samples = list(charades.CharadesSTASource(annotations=CHARADES, limit=4))
    texts = ["From 24.3 to 30.4 seconds.", "24.3 - 30.4", "somewhere", "[0, 1]"]
    m = score_generations("charades_sta", samples, texts)
    assert m["llm_timelens"]["R1@0.7"] == 50.0 and m["unparsed"] == 1
    with pytest.raises(ValueError, match="4 samples but 3 completions"):
        score_generations("charades_sta", samples, texts[:3])


def test_niah_predictions_file(tmp_path):
    path = tmp_path / "n.jsonl"
    path.write_text('{"answer": "1234567", "expected": ["1234567"], "length": 4096, "depth": 0.5}\n'
                    '{"answer": "nope", "expected": ["7654321", "1111111"], "length": 8192, "depth": 0.5}\n')
    m = score("niah", path)
    assert m["score"] == 50.0 and m["by_length"]["8192"]["score"] == 0.0 and m["by_depth"]["0.5"]["n"] == 2
