"""RewardScorer: routing, worker processes, and every error path (raise naming reward + sample, zero + count)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from rewards import RewardError, RewardScorer, RewardSpecError

PLUGIN = textwrap.dedent(
    '''
    import math, os, sys, time

    def behave(completion, reference, **meta):
        if completion == "sleep":
            time.sleep(60)
        if completion == "nan":
            return math.nan
        if completion == "boom":
            raise KeyError("boom key")
        if completion == "die":
            os._exit(7)
        if completion == "torch?":
            return float("torch" in sys.modules)
        return float(completion == reference)

    def trl_short(prompts, completions, **kwargs):
        return [1.0] * (len(completions) - 1)

    def trl_len(prompts, completions, reference, **kwargs):
        return [float(len(c) == r) for c, r in zip(completions, reference)]

    def compute_score(data_source, solution_str, ground_truth, extra_info):
        return float(solution_str.strip() == ground_truth) + (0.5 if data_source == "verl_domain" else 0.0)
    '''
)


def sample(i, domain, completion, reference, **extra):
    return {"id": f"s{i}", "domain": domain, "prompt": "q", "completion": completion, "reference": reference,
            "metadata": extra.pop("metadata", {}), **extra}


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cfg")
    (folder / "plug.py").write_text(PLUGIN)
    return folder


def mixed_batch():
    return [
        sample(0, "video", "<answer>[5, 15]</answer>", [0, 10]),
        sample(1, "video", "I have no idea", [0, 10]),
        sample(2, "math", "Answer: 7", 7),
        sample(3, "math", "seven", 7),
        sample(4, "retrieval", "The code is BLUE", "blue", reward="token_f1"),
        sample(5, "combo", "<answer>42</answer>", 42),
        sample(6, "combo", "<answer>forty-two</answer>", 42),
        sample(7, "video", "[0,10]", [0, 10], metadata={"duration": 5.0}),
    ]


ROUTES = {
    "video": "temporal_iou",
    "math": "numeric_match",
    "combo": [{"reward": "numeric_match", "weight": 1.0}, {"reward": "answer_tag", "weight": 0.5}],
}
EXPECTED = [1 / 3, 0.0, 1.0, 0.0, 0.4, 1.5, 0.5, 1.0]  # token F1 of 4 tokens vs 1: P 1/4, R 1 -> 0.4


@pytest.mark.parametrize("num_workers", [0, 2])
def test_mixed_batch_routes_and_counts_invalid(num_workers):
    with RewardScorer(ROUTES, num_workers=num_workers) as scorer:
        result = scorer.score(mixed_batch())
        again = scorer.score(mixed_batch()[::-1])  # the pool is reused and order follows the input
    assert result.rewards.dtype == np.float64 and result.rewards.shape == (8,)
    np.testing.assert_allclose(result.rewards, EXPECTED)
    np.testing.assert_allclose(again.rewards, EXPECTED[::-1])
    assert result.invalid.tolist() == [False, True, False, True, False, False, True, False]
    assert result.invalid_reasons == {"temporal_iou: no interval found": 1, "numeric_match: no number found": 2}
    assert result.errors == [] and not result.failed.any()
    metrics = result.metrics()
    assert metrics["reward/invalid_frac"] == pytest.approx(3 / 8)
    assert metrics["reward/mean"] == pytest.approx(np.mean(EXPECTED))
    assert metrics["reward/video/mean"] == pytest.approx((1 / 3 + 0 + 1) / 3)
    assert metrics["reward/math/invalid_frac"] == pytest.approx(0.5)


def test_unknown_domain_and_bad_route_fail_early():
    with pytest.raises(RewardSpecError, match="unknown reward 'nope'"):
        RewardScorer({"video": "nope"}, num_workers=0)
    scorer = RewardScorer({"video": "temporal_iou"}, num_workers=0)
    with pytest.raises(ValueError, match="sample 's0': no reward route for domain 'audio'; routes: video"):
        scorer.score([sample(0, "audio", "x", None)])
    with pytest.raises(ValueError, match="on_error"):
        RewardScorer({}, on_error="ignore")


def test_unpicklable_callable_route_needs_in_process_scoring():
    def local(completion, reference):
        return 1.0

    with pytest.raises(RewardSpecError, match="cannot be sent to worker processes"):
        RewardScorer({"d": local}, num_workers=1)
    assert RewardScorer({"d": local}, num_workers=0).score([sample(0, "d", "x", None)]).rewards.tolist() == [1.0]


def test_errors_raise_naming_reward_and_sample(plugin_dir):
    scorer = RewardScorer({"d": "plug.py:behave"}, num_workers=0, base_dir=plugin_dir)
    batch = [sample(0, "d", "ok", "ok"), sample(1, "d", "boom", "x"), sample(2, "d", "nan", "x")]
    with pytest.raises(RewardError) as info:
        scorer.score(batch)
    message = str(info.value)
    assert "reward 'plug.py:behave' failed on sample 's1' (completion 'boom'): KeyError: 'boom key'" in message
    assert "(and 1 more)" in message
    assert "sample 's2'" in info.value.errors[1] and "non-finite value nan" in info.value.errors[1]


def test_on_error_zero_counts_and_keeps_going(plugin_dir):
    warnings = []
    scorer = RewardScorer({"d": "plug.py:behave"}, num_workers=0, on_error="zero", base_dir=plugin_dir,
                          max_error_frac=1.0, warn=warnings.append)
    result = scorer.score([sample(0, "d", "ok", "ok"), sample(1, "d", "boom", "x"), sample(2, "d", "nan", "x")])
    assert result.rewards.tolist() == [1.0, 0.0, 0.0]
    assert result.failed.tolist() == [False, True, True] and len(result.errors) == 2
    assert result.metrics()["reward/error_frac"] == pytest.approx(2 / 3)
    assert len(warnings) == 1 and "reward 'plug.py:behave' failed on 2 of 3 samples so far" in warnings[0]
    scorer.score([sample(3, "d", "boom", "x")])
    assert len(warnings) == 1  # warned once per reward, counted every batch


def test_on_error_zero_still_stops_a_reward_that_is_broken_for_every_sample(plugin_dir):
    """Judged over the samples scored so far (from the 8th on): one failure in a small batch is noise."""
    scorer = RewardScorer({"d": "plug.py:behave", "ok": "exact_match"}, num_workers=0, on_error="zero",
                          base_dir=plugin_dir, warn=lambda m: None)
    result = scorer.score([sample(0, "d", "boom", "x"), sample(1, "ok", "a", "a")])
    assert result.failed.tolist() == [True, False]  # 1 of 1, but too few samples to call the reward broken
    result = scorer.score([sample(i, "d", "ok", "ok") for i in range(5)] + [sample(9, "d", "boom", "x")])
    assert result.failed.sum() == 1  # 2 of 7 so far: zeroed and counted
    with pytest.raises(RewardError, match=r"reward 'plug.py:behave' failed on 6 of 11 samples so far, more than "
                                          r"rewards.max_error_frac=0.5: it is broken, not flaky; latest: .*KeyError"):
        scorer.score([sample(i, "d", "boom", "x") for i in range(4)])
    broken = RewardScorer({"d": "plug.py:behave"}, num_workers=0, on_error="zero", base_dir=plugin_dir,
                          warn=lambda m: None)
    with pytest.raises(RewardError, match="failed on 8 of 8 samples so far"):  # 100% broken: the first batch
        broken.score([sample(i, "d", "boom", "x") for i in range(8)])


def test_in_process_scoring_enforces_the_timeout(plugin_dir):
    """num_workers=0 used to wait forever on a reward that never returns; now the call is abandoned."""
    import time

    scorer = RewardScorer({"d": "plug.py:behave"}, num_workers=0, timeout_s=0.5, base_dir=plugin_dir)
    start = time.monotonic()
    with pytest.raises(RewardError, match=r"sample 's0' .*timed out after 0.5s \(in-process"):
        scorer.score([sample(0, "d", "sleep", "x"), sample(1, "d", "ok", "ok")])
    assert time.monotonic() - start < 5
    zero = RewardScorer({"d": "plug.py:behave"}, num_workers=0, timeout_s=0.5, on_error="zero",
                        max_error_frac=1.0, base_dir=plugin_dir, warn=lambda m: None)
    result = zero.score([sample(0, "d", "sleep", "x"), sample(1, "d", "ok", "ok")])
    assert result.rewards.tolist() == [0.0, 1.0] and result.failed.tolist() == [True, False]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_reward_module_that_blocks_at_import_is_an_error_not_a_hang(tmp_path, num_workers):
    import time

    (tmp_path / "stuck.py").write_text("import time\ntime.sleep(3600)\ndef r(completion, reference):\n    return 1.0\n")
    start = time.monotonic()
    with pytest.raises(RewardSpecError, match=r"loading reward 'stuck.py:r'.*timed out after 0.5s"):
        RewardScorer({"d": "stuck.py:r"}, num_workers=num_workers, base_dir=tmp_path, load_timeout_s=0.5)
    assert time.monotonic() - start < 5


def test_wrong_length_from_trl_reward(plugin_dir):
    scorer = RewardScorer({"d": "plug.py:trl_short"}, num_workers=0, base_dir=plugin_dir)
    with pytest.raises(RewardError, match="returned 1 values for a batch of 2"):
        scorer.score([sample(0, "d", "a", None), sample(1, "d", "b", None)])


def test_three_signatures_from_files_in_workers(plugin_dir):
    routes = {"native": "plug.py:behave", "trl": "plug.py:trl_len", "verl_domain": "plug.py:compute_score"}
    batch = [
        sample(0, "native", "yes", "yes"),
        sample(1, "trl", "abc", 3),
        sample(2, "trl", "ab", 3),
        sample(3, "verl_domain", " 12 ", "12"),
        sample(4, "native", "torch?", None),  # workers never import torch
    ]
    with RewardScorer(routes, num_workers=2, base_dir=plugin_dir) as scorer:
        result = scorer.score(batch)
    assert result.rewards.tolist() == [1.0, 1.0, 0.0, 1.5, 0.0]


def test_timeout_kills_hung_reward_and_names_it(plugin_dir):
    batch = [sample(0, "d", "a", "a"), sample(1, "d", "sleep", "a"), sample(2, "d", "a", "a"), sample(3, "d", "b", "a")]
    with RewardScorer({"d": "plug.py:behave"}, num_workers=1, timeout_s=1, base_dir=plugin_dir, chunk_size=4) as scorer:
        scorer.score([sample(9, "d", "a", "a")])  # start the worker outside the timed part
        start = time.monotonic()
        with pytest.raises(RewardError, match=r"reward 'plug.py:behave' failed on sample 's1' \(completion 'sleep'\): "
                                              r"timed out after 1s"):
            scorer.score(batch)
        assert time.monotonic() - start < 10
        scorer.on_error = "zero"
        result = scorer.score(batch)
        assert result.rewards.tolist() == [1.0, 0.0, 1.0, 0.0]  # the rest of the chunk ran on a fresh worker
        assert result.failed.tolist() == [False, True, False, False]
        assert scorer._pool.restarts == 2


def test_worker_crash_is_reported_and_replaced(plugin_dir):
    batch = [sample(0, "d", "die", "a"), sample(1, "d", "a", "a")]
    with RewardScorer({"d": "plug.py:behave"}, num_workers=1, on_error="zero", base_dir=plugin_dir,
                      chunk_size=2) as scorer:
        result = scorer.score(batch)
    assert result.rewards.tolist() == [0.0, 1.0]
    assert "reward worker process died (exit code 7)" in result.errors[0] and "sample 's0'" in result.errors[0]


def test_close_stops_workers():
    scorer = RewardScorer({"m": "numeric_match"}, num_workers=2)
    scorer.score([sample(0, "m", "1", 1)])
    procs = [w.proc for w in scorer._pool._workers]
    scorer.close()
    assert all(p.poll() is not None for p in procs)
    assert scorer.score([sample(0, "m", "2", 2)]).rewards.tolist() == [1.0]  # restarts on demand
    scorer.close()


def test_importing_rewards_does_not_import_torch():
    code = "import sys, rewards; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
