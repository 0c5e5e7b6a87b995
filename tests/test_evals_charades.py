"""Charades-STA: both protocols on hand-made predictions (IoU = t edges included) and on the shared test split."""

import json
from pathlib import Path

import pytest

from evals import charades
from evals.io import PredictionsError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "charades_sta"


@pytest.fixture
def tiny(tmp_path):
    (tmp_path / "anno.txt").write_text(
        "AAA 0.0 10.0##a person opens a door.\n"
        "AAA 20.0 40.0##a person sits down.\n"
        "BBB 5.0 30.0##the window ends after the video.\n")
    (tmp_path / "Charades_v1_test.csv").write_text('id,script,length\nAAA,"x, y",60.0\nBBB,z,20.0\n')
    return tmp_path / "anno.txt"


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_ground_truth_end_is_clipped_to_video_length(tiny):
    anns = charades.load_annotations(tiny)
    assert [a["window"] for a in anns] == [[0.0, 10.0], [20.0, 40.0], [5.0, 20.0]]
    assert anns[2]["duration"] == 20.0 and anns[0]["sentence"] == "a person opens a door."


def test_both_protocols_hand_computed(tiny, tmp_path):
    # top-1 IoUs: 0.5 (edge), 0.0, 1.0 (only after clipping); the 2nd line's 2nd window has IoU 14/20 = 0.7 (edge)
    preds = write(tmp_path / "p.jsonl", [{"pred_windows": [[0, 5]]},
                                         {"pred_windows": [[0, 1], [20, 34]]},
                                         {"pred_windows": [[5, 20]]}])
    m = charades.score_file(preds, tiny)
    assert m["llm_timelens"] == {"R1@0.3": 66.67, "R1@0.5": 66.67, "R1@0.7": 33.33, "mIoU": 50.0}
    # 2D-TAN counts IoU > t: the 0.5 and 0.7 edges are misses
    assert m["2d_tan"] == {"R1@0.5": 33.33, "R1@0.7": 33.33, "R5@0.5": 66.67, "R5@0.7": 33.33}
    assert m["n"] == 3 and m["unparsed"] == 0


def test_free_text_answers_and_empty_predictions(tiny, tmp_path):
    preds = write(tmp_path / "p.jsonl", [{"answer": "It happens at 0.0 - 10.0 seconds."},
                                         {"answer": "I do not know."},
                                         {"pred_windows": []}])
    m = charades.score_file(preds, tiny)
    assert m["llm_timelens"]["R1@0.7"] == 33.33 and m["llm_timelens"]["mIoU"] == 33.33
    assert m["unparsed"] == 1


def test_bad_input_is_a_clear_error(tiny, tmp_path):
    with pytest.raises(PredictionsError, match="2 prediction lines for 3 annotation lines"):
        charades.score_file(write(tmp_path / "short.jsonl", [{"pred_windows": [[0, 1]]}] * 2), tiny)
    rows = [{"pred_windows": [[0, 1]]}, {"pred_windows": [[8, 2]]}, {"pred_windows": [[0, 1]]}]
    with pytest.raises(PredictionsError, match=r"rev\.jsonl:2: pred_windows\[0\] has start 8.0 > end 2.0"):
        charades.score_file(write(tmp_path / "rev.jsonl", rows), tiny)
    rows = [{"pred_windows": [[0, 1]]}, {"windows": [[0, 1]]}, {"pred_windows": [[0, 1]]}]
    with pytest.raises(PredictionsError, match=r"key\.jsonl:2: needs 'pred_windows' or 'answer'"):
        charades.score_file(write(tmp_path / "key.jsonl", rows), tiny)
    rows = [{"index": 0, "answer": "1-2"}, {"index": 2, "answer": "1-2"}, {"index": 1, "answer": "1-2"}]
    with pytest.raises(PredictionsError, match=r"idx\.jsonl:2: index 2 but this is prediction 1"):
        charades.score_file(write(tmp_path / "idx.jsonl", rows), tiny)


@pytest.mark.skipif(not (DATA / "charades_sta_test.txt").is_file(), reason="shared Charades-STA files absent")
def test_perfect_predictions_score_100_on_the_test_split(tmp_path):
    anns = charades.load_annotations(DATA / "charades_sta_test.txt")
    assert len(anns) == 3720 and len({a["vid"] for a in anns}) == 1334
    assert sum(a["window"][1] == a["duration"] for a in anns) >= 562  # ends clipped to the video length
    preds = write(tmp_path / "p.jsonl", [{"pred_windows": [a["window"]]} for a in anns])
    m = charades.score_file(preds, DATA / "charades_sta_test.txt")
    assert set(m["llm_timelens"].values()) == {100.0} and set(m["2d_tan"].values()) == {100.0}


@pytest.mark.skipif(not (DATA / "charades_sta_test.txt").is_file(), reason="shared Charades-STA files absent")
def test_adapter_yields_video_references_and_skips_missing(tmp_path):
    (tmp_path / "3MSZA.mp4").write_bytes(b"")
    source = charades.CharadesSTASource(annotations=DATA / "charades_sta_test.txt", video_dir=tmp_path, fps=2.0)
    n_3msza = sum(line.startswith("3MSZA ") for line in (DATA / "charades_sta_test.txt").read_text().splitlines())
    assert len(source) == n_3msza == 4 and len(source.skipped) == 3720 - 4
    sample = next(iter(source))
    assert sample.reference["window"] == [24.3, 30.4] and sample.metadata["vid"] == "3MSZA"
    assert sample.videos()[0].path.endswith("3MSZA.mp4") and sample.videos()[0].fps == 2.0
    assert "person turn a light on." in sample.messages[0]["content"][1]["text"]
    annotation_only = charades.CharadesSTASource(annotations=DATA / "charades_sta_test.txt", limit=5)
    assert len(annotation_only) == 5 and len(annotation_only.skipped) == 0
