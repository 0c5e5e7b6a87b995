"""QVHighlights scorer against hand-computed values, the official evaluator's edge rules, and the shared file."""

import json
from pathlib import Path

import numpy as np
import pytest

from evals import qvhighlights as qvh
from evals.io import PredictionsError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "qvhighlights" / "highlight_val_release.jsonl"


def ann(qid, windows, duration=150, clip_ids=(), saliency=()):
    return {"qid": qid, "query": "q", "vid": f"v{qid}", "duration": duration, "relevant_windows": windows,
            "relevant_clip_ids": list(clip_ids), "saliency_scores": [list(s) for s in saliency]}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_tied_scores_keep_file_order():
    # sorted stably: [40,50] (fp), [20,30] (tp), [0,10] (tp): precision 0, 1/2, 2/3; recall 0, 1/2, 1
    # -> interpolated AP = 0.5 * 2/3 + 0.5 * 2/3 = 2/3 at every threshold (5/6 if ties were reordered)
    gts = np.array([[0.0, 10.0], [20.0, 30.0]])
    preds = [[0.0, 10.0, 0.5], [40.0, 50.0, 0.9], [20.0, 30.0, 0.9]]
    assert np.allclose(qvh.detection_ap(gts, preds), 2 / 3)
    swapped = [[0.0, 10.0, 0.5], [20.0, 30.0, 0.9], [40.0, 50.0, 0.9]]
    assert np.allclose(qvh.detection_ap(gts, swapped), 5 / 6)


def test_one_to_one_matching_duplicates_are_false_positives():
    gts = np.array([[0.0, 10.0]])
    preds = [[0.0, 10.0, 0.9], [0.0, 10.0, 0.8]]  # tp then fp: AP stays 1
    assert np.allclose(qvh.detection_ap(gts, preds), 1.0)
    preds = [[0.0, 10.0, 0.8], [0.0, 10.0, 0.9], [50.0, 60.0, 0.95]]  # fp, tp, fp -> AP 1/2
    assert np.allclose(qvh.detection_ap(gts, preds), 0.5)


def test_iou_equal_to_threshold_is_a_hit_for_map_and_r1():
    anns = [ann(1, [[0, 10]])]
    m = qvh.evaluate([{"qid": 1, "pred_relevant_windows": [[0.0, 5.0, 1.0]]}], anns)
    assert m["full"]["MR-R1"]["0.5"] == 100.0 and m["full"]["MR-R1"]["0.55"] == 0.0
    assert m["full"]["MR-mAP"]["0.5"] == 100.0 and m["full"]["MR-mAP"]["0.55"] == 0.0
    assert m["brief"]["MR-full-mAP"] == 10.0  # mean over 10 thresholds of (1, 0, ..., 0)


def test_only_first_ten_windows_count_and_r1_uses_first_listed():
    anns = [ann(1, [[100, 120]])]
    windows = [[float(k), float(k) + 1, 0.5] for k in range(10)] + [[100.0, 120.0, 0.99]]
    m = qvh.evaluate([{"qid": 1, "pred_relevant_windows": windows}], anns)
    assert m["brief"]["MR-full-mAP"] == 0.0
    # R1 takes the first *listed* window even when a later one scores higher
    windows = [[0.0, 5.0, 0.1], [100.0, 120.0, 0.99]]
    m = qvh.evaluate([{"qid": 1, "pred_relevant_windows": windows}], anns)
    assert m["brief"]["MR-full-R1@0.5"] == 0.0 and m["brief"]["MR-full-mAP"] == 100.0


def test_r1_matches_best_ground_truth_window_and_mean_over_queries():
    anns = [ann(1, [[0, 10], [50, 70]]), ann(2, [[0, 20]])]
    preds = [{"qid": 1, "pred_relevant_windows": [[52.0, 70.0, 1.0]]},  # IoU 0.9 with the 2nd window
             {"qid": 2, "pred_relevant_windows": [[0.0, 12.0, 1.0]]}]  # IoU 0.6
    m = qvh.evaluate(preds, anns)
    assert m["brief"]["MR-full-R1@0.5"] == 100.0
    assert m["brief"]["MR-full-R1@0.7"] == 50.0


def test_length_buckets_keep_only_their_ground_truth_windows():
    # query 1 has a short (5 s) and a long (40 s) window; the prediction finds only the long one
    anns = [ann(1, [[0, 5], [50, 90]])]
    m = qvh.evaluate([{"qid": 1, "pred_relevant_windows": [[50.0, 90.0, 1.0]]}], anns)
    assert m["brief"]["MR-long-mAP"] == 100.0
    assert m["brief"]["MR-short-mAP"] == 0.0
    assert m["brief"]["MR-full-mAP"] == 50.0  # one of two windows recalled at precision 1
    assert m["middle"]["n"] == 0 and m["brief"]["MR-middle-mAP"] is None


def test_empty_window_list_scores_zero():
    anns = [ann(1, [[0, 10]]), ann(2, [[0, 10]])]
    preds = [{"qid": 1, "pred_relevant_windows": []}, {"qid": 2, "pred_relevant_windows": [[0.0, 10.0, 1.0]]}]
    m = qvh.evaluate(preds, anns)
    assert m["brief"]["MR-full-mAP"] == 50.0 and m["brief"]["MR-full-R1@0.5"] == 50.0


def test_saliency_ap_ties_are_one_cutoff():
    y = np.array([1.0, 0.0, 1.0, 0.0])
    assert qvh.saliency_ap(y, np.array([0.9, 0.9, 0.1, 0.1])) == pytest.approx(0.5)
    assert qvh.saliency_ap(y, np.array([0.9, 0.8, 0.1, 0.2])) == pytest.approx(0.75)
    assert qvh.saliency_ap(np.zeros(4), np.arange(4.0)) == 0.0
    assert qvh.saliency_ap(np.ones(4), np.arange(4.0)) == 1.0


def test_highlight_metrics_hand_computed():
    # 4 clips; ratings clip0 [4,2,1], clip2 [2,3,0]
    anns = [ann(1, [[0, 2]], duration=8, clip_ids=[0, 2], saliency=[[4, 2, 1], [2, 3, 0]])]
    m = qvh.evaluate([{"qid": 1, "pred_saliency_scores": [0.9, 0.9, 0.1, 0.1]}], anns)
    b = m["brief"]
    assert b["HL-min-Fair-mAP"] == 33.33 and b["HL-min-Good-mAP"] == 25.0 and b["HL-min-VeryGood-mAP"] == 16.67
    assert b["HL-min-Fair-Hit1"] == b["HL-min-Good-Hit1"] == b["HL-min-VeryGood-Hit1"] == 100.0
    assert "MR-full-mAP" not in b
    # short predictions are zero-padded: same ranking, same AP
    padded = qvh.evaluate([{"qid": 1, "pred_saliency_scores": [0.9, 0.9]}], anns)["brief"]
    assert padded["HL-min-Fair-mAP"] == 33.33
    # HIT@1 looks at the uncut scores: a maximum beyond the video's clips is a miss
    beyond = qvh.evaluate([{"qid": 1, "pred_saliency_scores": [0.9, 0.0, 0.0, 0.0, 0.0, 1.0]}], anns)["brief"]
    assert beyond["HL-min-Fair-Hit1"] == 0.0


def test_bad_predictions_name_file_line_and_problem(tmp_path):
    anns = [ann(1, [[0, 10]]), ann(2, [[0, 10]])]
    good = {"qid": 1, "pred_relevant_windows": [[0, 10, 1]], "pred_saliency_scores": [0.1]}
    path = write_jsonl(tmp_path / "p.jsonl", [good, {**good, "qid": 2, "pred_relevant_windows": [[9, 3, 1]]}])
    with pytest.raises(PredictionsError, match=r"p\.jsonl:2: .*start 9.0 > end 3.0"):
        qvh.read_predictions(path, anns)
    path = write_jsonl(tmp_path / "dup.jsonl", [good, good])
    with pytest.raises(PredictionsError, match="1 duplicate qids.*1 of 2 annotated qids missing"):
        qvh.read_predictions(path, anns)
    path.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(PredictionsError, match=r"dup\.jsonl:2: not valid JSON"):
        qvh.read_predictions(path, anns)


@pytest.mark.skipif(not DATA.is_file(), reason="shared QVHighlights annotations absent")
def test_perfect_windows_on_the_val_file(tmp_path):
    anns = qvh.load_annotations(DATA)
    assert len(anns) == 1550
    rows = [{"qid": a["qid"], "pred_relevant_windows": [[s, e, 1.0] for s, e in a["relevant_windows"]]}
            for a in anns]
    brief = qvh.score_file(write_jsonl(tmp_path / "perfect.jsonl", rows), DATA)["brief"]
    assert brief["MR-full-R1@0.5"] == brief["MR-full-R1@0.7"] == 100.0
    # only 10 windows count: a query with M > 10 windows recalls 10/M at precision 1, so AP = 10/M
    expected = 100 * np.mean([min(10, len(a["relevant_windows"])) / len(a["relevant_windows"]) for a in anns])
    assert brief["MR-full-mAP"] == round(expected, 2) == 99.76
    # restricted to queries with at most 10 windows, every threshold scores 100
    few = [a for a in anns if len(a["relevant_windows"]) <= 10]
    m = qvh.evaluate([r for r, a in zip(rows, anns) if len(a["relevant_windows"]) <= 10], few)
    assert m["brief"]["MR-full-mAP"] == 100.0 and set(m["full"]["MR-mAP"].values()) == {100.0}
    # length buckets keep every predicted window, so windows of other lengths are false positives there
    assert m["brief"]["MR-short-mAP"] < 100.0


@pytest.mark.skipif(not DATA.is_file(), reason="shared QVHighlights annotations absent")
def test_adapter_skips_missing_videos(tmp_path):
    anns = qvh.load_annotations(DATA)[:3]
    (tmp_path / f"{anns[1]['vid']}.mp4").write_bytes(b"")
    source = qvh.QVHighlightsSource(annotations=DATA, video_dir=tmp_path, limit=None, fps=2.0)
    assert len(source) == 1 and len(source.skipped) == 1549
    sample = next(iter(source))
    assert sample.reference["qid"] == anns[1]["qid"] and sample.metadata["vid"] == anns[1]["vid"]
    video = sample.videos()[0]
    assert video.path.endswith(f"{anns[1]['vid']}.mp4") and video.fps == 2.0
    assert "video missing: 1549" in source.skipped.report("qvhighlights")
