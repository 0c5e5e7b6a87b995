"""The held-out report: per-domain means with per-length and binned per-depth breakdowns."""

from __future__ import annotations

import pytest

from rewards.scorer import RewardScorer
from rl.evaluation import score_completions
from tasks.base import Sample


def needle(i: int, length: int, depth: float) -> Sample:
    return Sample(id=f"r{i}", domain="retrieval", messages=[{"role": "user", "content": "q"}],
                  reference={"key": "maple", "value": "gold"}, metadata={"length": length, "depth": depth})


def test_length_rows_and_depth_in_quarter_bins():
    samples = [needle(0, 8, 0.07), needle(1, 8, 0.13), needle(2, 16, 0.47), needle(3, 16, 0.93), needle(4, 12, 1.0)]
    completions = [" gold", " fish", " gold", " gold", "garbage answer"]
    routes = {"retrieval": "record_value"}
    with RewardScorer(routes, num_workers=0) as scorer:
        report = score_completions(samples, completions, scorer, routes)["retrieval"]
    assert report["mean_reward"] == pytest.approx(3 / 5) and report["n"] == 5
    assert list(report["breakdown"]["length"]) == ["8", "12", "16"]  # numeric order, not text order
    assert report["breakdown"]["length"] == {"8": 0.5, "12": 0.0, "16": 1.0}
    # 0.07 -> 0.00, 0.13 -> 0.25, 0.47 -> 0.50, 0.93 and 1.0 -> 1.00
    assert report["breakdown"]["depth"] == {"0.00": 1.0, "0.25": 0.0, "0.50": 1.0, "1.00": 0.5}
