"""Policy losses and advantage estimators against hand computations written here with plain loops / numpy.

GSPO: sequence ratio s_i = exp(mean_t(logp - old_logp)), clipped to [1 - clip_low, 1 + clip_high], objective
min(s_i A_i, clip(s_i) A_i), loss = -mean over sequences. Gradients are checked against the analytic form
d loss / d logp_it = -(1/N) * [min picks the unclipped term] * A_i * s_i / L_i.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mopd.estimator  # noqa: F401  (registered before any test copies the registry)
from rl import algorithms
from rl.algorithms import get_advantage_estimator, get_policy_loss

CFG = {"clip_low": 0.2, "clip_high": 0.28}


# ----------------------------------------------------------------------------- hand references


def gspo_reference(logp, old, adv, mask, clip_low, clip_high, agg="seq"):
    """(loss, grad wrt logp, clipped flags) of GSPO by plain Python loops over nested lists."""
    b, t = len(logp), len(logp[0])
    objs, grads_obj, lengths, clipped = [], [], [], []
    for i in range(b):
        idx = [j for j in range(t) if mask[i][j] > 0]
        length = len(idx)
        lengths.append(length)
        if length == 0:
            objs.append(0.0)
            grads_obj.append([0.0] * t)
            clipped.append(False)
            continue
        s = math.exp(sum(logp[i][j] - old[i][j] for j in idx) / length)
        a = sum(adv[i][j] for j in idx) / length
        cs = min(max(s, 1 - clip_low), 1 + clip_high)
        unclipped, clip_term = s * a, cs * a
        is_clipped = clip_term < unclipped
        objs.append(min(unclipped, clip_term))
        clipped.append(is_clipped)
        g = [0.0] * t
        if not is_clipped:
            for j in idx:
                g[j] = a * s / length
        grads_obj.append(g)
    if agg == "seq":
        n = sum(1 for L in lengths if L > 0)
        weights = [(1.0 / n if L > 0 else 0.0) for L in lengths]
    else:  # token_mean: sequences weighted by their length
        total = sum(lengths)
        weights = [L / total for L in lengths]
    loss = -sum(w * o for w, o in zip(weights, objs))
    grad = [[-weights[i] * grads_obj[i][j] for j in range(t)] for i in range(b)]
    return loss, grad, clipped


def token_clip_reference(logp, old, adv, mask, clip_low, clip_high, agg, seq_ratio=False):
    """(loss, grad) of a token-level clipped objective: GRPO (token ratio) or GSPO-token (seq_ratio=True)."""
    b, t = len(logp), len(logp[0])
    obj = [[0.0] * t for _ in range(b)]
    dobj = [[0.0] * t for _ in range(b)]  # d obj_it / d logp_it
    for i in range(b):
        idx = [j for j in range(t) if mask[i][j] > 0]
        s_seq = math.exp(sum(logp[i][j] - old[i][j] for j in idx) / len(idx)) if idx else 1.0
        for j in idx:
            r = s_seq if seq_ratio else math.exp(logp[i][j] - old[i][j])
            a = adv[i][j]
            cr = min(max(r, 1 - clip_low), 1 + clip_high)
            if cr * a < r * a:
                obj[i][j] = cr * a
            else:
                obj[i][j] = r * a
                dobj[i][j] = r * a
    coef = [[0.0] * t for _ in range(b)]
    if agg == "seq_mean_token_mean":
        n = sum(1 for i in range(b) if any(mask[i][j] > 0 for j in range(t)))
        for i in range(b):
            length = sum(1 for j in range(t) if mask[i][j] > 0)
            for j in range(t):
                if mask[i][j] > 0:
                    coef[i][j] = 1.0 / (n * length)
    elif agg == "token_mean":
        total = sum(1 for i in range(b) for j in range(t) if mask[i][j] > 0)
        for i in range(b):
            for j in range(t):
                if mask[i][j] > 0:
                    coef[i][j] = 1.0 / total
    elif agg == "seq_mean_token_sum_norm":
        for i in range(b):
            for j in range(t):
                if mask[i][j] > 0:
                    coef[i][j] = 1.0 / (b * t)
    loss = -sum(coef[i][j] * obj[i][j] for i in range(b) for j in range(t))
    grad = [[-coef[i][j] * dobj[i][j] for j in range(t)] for i in range(b)]
    return loss, grad


def run_loss(name, logp, old, adv, mask, cfg, weights=None):
    lp = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    loss, metrics = get_policy_loss(name)(
        lp, torch.tensor(old, dtype=torch.float64), torch.tensor(adv, dtype=torch.float64),
        torch.tensor(mask, dtype=torch.float64), cfg,
        **({} if weights is None else {"weights": torch.tensor(weights, dtype=torch.float64)}),
    )
    loss.backward()
    return float(loss.detach()), lp.grad.numpy(), metrics


# A batch of four sequences, T = 4, exercising each branch of the clip (clip_low 0.2, clip_high 0.28):
#   row 0: mean log-ratio 0.1  -> s = 1.105 inside [0.8, 1.28], A > 0: unclipped
#   row 1: mean log-ratio 0.4  -> s = 1.49 > 1.28, A > 0: the clip binds (no gradient)
#   row 2: mean log-ratio 0.4  -> s = 1.49 > 1.28, A < 0: min picks s*A, the clip does not bind
#   row 3: mean log-ratio -0.5 -> s = 0.61 < 0.8, A < 0: the clip binds
LOGP = [[-1.0, -2.0, -0.5, -1.5], [-0.2, -0.3, -0.4, 0.0], [-1.1, -0.9, -1.3, 0.0], [-2.0, -2.5, 0.0, 0.0]]
OLD = [[-1.1, -2.1, -0.6, -1.6], [-0.6, -0.7, -0.8, 0.0], [-1.5, -1.3, -1.7, 0.0], [-1.5, -2.0, 0.0, 0.0]]
MASK = [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 0, 0]]
ADV_CONST = [[0.7] * 4, [1.3] * 4, [-0.9] * 4, [-0.4] * 4]
ADV_VARY = [[0.5, -1.0, 2.0, 0.3], [1.0, 2.0, 0.5, 9.0], [-0.5, -1.5, 0.2, 7.0], [0.3, -2.0, 5.0, 5.0]]


# ----------------------------------------------------------------------------- GSPO


def test_gspo_loss_and_gradient_match_hand_computation():
    loss, grad, metrics = run_loss("gspo", LOGP, OLD, ADV_VARY, MASK, CFG)
    ref_loss, ref_grad, clipped = gspo_reference(LOGP, OLD, ADV_VARY, MASK, 0.2, 0.28)
    assert loss == pytest.approx(ref_loss, abs=1e-12)
    np.testing.assert_allclose(grad, np.array(ref_grad), atol=1e-12)
    # the case table above: which rows the clip binds on
    assert clipped == [False, True, False, True]
    assert metrics["actor/clip_frac"] == pytest.approx(0.5)
    ratios = [math.exp(sum(LOGP[i][j] - OLD[i][j] for j in range(4) if MASK[i][j]) / sum(MASK[i])) for i in range(4)]
    assert metrics["actor/ratio_mean"] == pytest.approx(sum(ratios) / 4, abs=1e-9)


def test_gspo_gradient_is_zero_exactly_where_the_clip_binds():
    _, grad, _ = run_loss("gspo", LOGP, OLD, ADV_CONST, MASK, CFG)
    assert np.all(grad[1] == 0) and np.all(grad[3] == 0)
    assert np.all(grad[0] != 0) and np.all(grad[2][:3] != 0)


def test_gspo_clip_bounds_are_asymmetric():
    """s = exp(0.25) = 1.284 exceeds 1 + clip_high = 1.28 and is clipped; s = exp(0.24) = 1.271 is not (a symmetric
    bound of 0.2 would clip both)."""
    for shift, binds in ((0.24, False), (0.25, True)):
        logp, old, adv, mask = [[shift, shift]], [[0.0, 0.0]], [[1.0, 1.0]], [[1, 1]]
        loss, grad, _ = run_loss("gspo", logp, old, adv, mask, {"clip_low": 0.2, "clip_high": 0.28})
        expected = -(1.28 if binds else math.exp(shift))
        assert loss == pytest.approx(expected, abs=1e-12)
        assert bool(np.all(grad == 0)) is binds
    # the low side uses clip_low: s = exp(-0.3) = 0.741 < 0.8 with A < 0 binds at 0.8
    loss, _, _ = run_loss("gspo", [[-0.3]], [[0.0]], [[-1.0]], [[1]], {"clip_low": 0.2, "clip_high": 0.28})
    assert loss == pytest.approx(0.8, abs=1e-12)


def test_gspo_padding_values_do_not_count():
    noisy = lambda rows, v: [[x if m else v for x, m in zip(r, mr)] for r, mr in zip(rows, MASK)]  # noqa: E731
    base = run_loss("gspo", LOGP, OLD, ADV_VARY, MASK, CFG)
    changed = run_loss("gspo", noisy(LOGP, 50.0), noisy(OLD, -70.0), noisy(ADV_VARY, 1e6), MASK, CFG)
    assert changed[0] == pytest.approx(base[0], abs=1e-12)
    np.testing.assert_allclose(changed[1], base[1], atol=1e-12)
    pad = np.array(MASK) == 0
    assert np.all(changed[1][pad] == 0)


def test_gspo_length_one_responses():
    logp, old, adv, mask = [[-0.5, 0.0], [-1.0, 0.0]], [[-0.6, 0.0], [-0.2, 0.0]], [[2.0, 0.0], [-1.0, 0.0]], [[1, 0], [1, 0]]
    loss, grad, _ = run_loss("gspo", logp, old, adv, mask, CFG)
    r0 = math.exp(0.1)  # row 1: exp(-0.8) = 0.449 < 0.8 and A < 0 -> clipped at 0.8
    assert loss == pytest.approx(-(r0 * 2.0 + 0.8 * -1.0) / 2, abs=1e-12)
    np.testing.assert_allclose(grad, [[-r0 * 2.0 / 2, 0.0], [0.0, 0.0]], atol=1e-12)


def test_gspo_all_masked_row_is_ignored():
    logp = LOGP[:2] + [[-3.0, -1.0, -2.0, -4.0]]
    old = OLD[:2] + [[-9.0, 5.0, 1.0, 0.0]]
    adv = ADV_VARY[:2] + [[4.0, 4.0, 4.0, 4.0]]
    mask = MASK[:2] + [[0, 0, 0, 0]]
    loss, grad, metrics = run_loss("gspo", logp, old, adv, mask, CFG)
    ref_loss, ref_grad, _ = run_loss("gspo", LOGP[:2], OLD[:2], ADV_VARY[:2], MASK[:2], CFG)
    assert math.isfinite(loss) and loss == pytest.approx(ref_loss, abs=1e-12)
    np.testing.assert_allclose(grad[:2], ref_grad, atol=1e-12)
    assert np.all(grad[2] == 0)
    assert metrics["actor/clip_frac"] == pytest.approx(0.5)  # row 1 of the two counted rows


def test_gspo_all_rows_masked_gives_zero_not_nan():
    loss, grad, _ = run_loss("gspo", LOGP, OLD, ADV_VARY, [[0] * 4] * 4, CFG)
    assert loss == 0.0 and np.all(grad == 0)


def test_gspo_token_mean_weighs_sequences_by_length():
    loss, grad, _ = run_loss("gspo", LOGP, OLD, ADV_VARY, MASK, {**CFG, "loss_agg": "token_mean"})
    ref_loss, ref_grad, _ = gspo_reference(LOGP, OLD, ADV_VARY, MASK, 0.2, 0.28, agg="token_mean")
    assert loss == pytest.approx(ref_loss, abs=1e-12)
    np.testing.assert_allclose(grad, np.array(ref_grad), atol=1e-12)


def test_gspo_truncated_importance_weights_scale_each_sequence():
    weights = [[0.5, 1.5, 1.0, 1.0], [2.0, 2.0, 2.0, 99.0], [1.0, 1.0, 1.0, 0.0], [0.1, 0.3, 0.0, 0.0]]
    loss, _, _ = run_loss("gspo", LOGP, OLD, ADV_VARY, MASK, CFG, weights=weights)
    objs = []
    for i in range(4):
        idx = [j for j in range(4) if MASK[i][j]]
        s = math.exp(sum(LOGP[i][j] - OLD[i][j] for j in idx) / len(idx))
        a = sum(ADV_VARY[i][j] for j in idx) / len(idx)
        w = sum(weights[i][j] for j in idx) / len(idx)
        objs.append(min(s * a, min(max(s, 0.8), 1.28) * a) * w)
    assert loss == pytest.approx(-sum(objs) / 4, abs=1e-12)


@pytest.mark.parametrize("cfg", [CFG, {**CFG, "clip_low": 0.05, "clip_high": 0.05}])
def test_gspo_token_equals_gspo_when_advantage_constant_per_sequence(cfg):
    gspo = run_loss("gspo", LOGP, OLD, ADV_CONST, MASK, cfg)
    token = run_loss("gspo_token", LOGP, OLD, ADV_CONST, MASK, cfg)
    assert token[0] == pytest.approx(gspo[0], abs=1e-12)
    np.testing.assert_allclose(token[1], gspo[1], atol=1e-12)


def test_gspo_token_with_per_token_advantages_matches_hand_computation():
    loss, grad, _ = run_loss("gspo_token", LOGP, OLD, ADV_VARY, MASK, CFG)
    ref_loss, ref_grad = token_clip_reference(LOGP, OLD, ADV_VARY, MASK, 0.2, 0.28, "seq_mean_token_mean", seq_ratio=True)
    assert loss == pytest.approx(ref_loss, abs=1e-12)
    np.testing.assert_allclose(grad, np.array(ref_grad), atol=1e-12)


# ----------------------------------------------------------------------------- GRPO and aggregation


@pytest.mark.parametrize("agg", ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"])
def test_grpo_token_ratio_matches_hand_computation(agg):
    cfg = {**CFG, "loss_agg": agg}
    loss, grad, metrics = run_loss("grpo", LOGP, OLD, ADV_VARY, MASK, cfg)
    ref_loss, ref_grad = token_clip_reference(LOGP, OLD, ADV_VARY, MASK, 0.2, 0.28, agg)
    assert loss == pytest.approx(ref_loss, abs=1e-12)
    np.testing.assert_allclose(grad, np.array(ref_grad), atol=1e-12)
    # clip fraction over counted tokens, by hand
    clipped = total = 0
    for i in range(4):
        for j in range(4):
            if MASK[i][j]:
                r, a = math.exp(LOGP[i][j] - OLD[i][j]), ADV_VARY[i][j]
                clipped += min(max(r, 0.8), 1.28) * a < r * a
                total += 1
    assert metrics["actor/clip_frac"] == pytest.approx(clipped / total)


def test_per_sequence_weights_turn_a_token_mean_into_the_sequence_mean():
    """What `algorithm.logit_loss_agg: seq_mean_token_mean` does to the logit losses' masked token mean."""
    loss = torch.tensor(LOGP, dtype=torch.float64)
    mask = torch.tensor(MASK, dtype=torch.float64)
    mask[2] = 0.0  # a sequence with no counted token neither counts nor divides
    weighted = algorithms.masked_mean(loss, algorithms.per_sequence_weights(mask))
    assert float(weighted) == pytest.approx(float(algorithms.aggregate_token_loss(loss, mask, "seq_mean_token_mean")))
    assert float(weighted) != pytest.approx(float(algorithms.aggregate_token_loss(loss, mask, "token_mean")))


def test_grpo_default_aggregation_is_seq_mean_token_mean():
    default = run_loss("grpo", LOGP, OLD, ADV_VARY, MASK, CFG)[0]
    explicit = run_loss("grpo", LOGP, OLD, ADV_VARY, MASK, {**CFG, "loss_agg": "seq_mean_token_mean"})[0]
    pooled = run_loss("grpo", LOGP, OLD, ADV_VARY, MASK, {**CFG, "loss_agg": "token_mean"})[0]
    assert default == explicit and default != pytest.approx(pooled)


def test_grpo_clip_defaults_and_cfg_as_attributes():
    """cfg may be an object with attributes (the typed AlgorithmConfig) or a dict; missing keys take the config's
    declared defaults (clip 0.2 / 0.28), not a second set of defaults inside the loss."""
    from rl.config import AlgorithmConfig

    typed = run_loss("grpo", LOGP, OLD, ADV_VARY, MASK, AlgorithmConfig(clip_low=0.2, clip_high=0.28))[0]
    assert typed == pytest.approx(run_loss("grpo", LOGP, OLD, ADV_VARY, MASK, CFG)[0], abs=1e-12)
    ref, _ = token_clip_reference(LOGP, OLD, ADV_VARY, MASK, 0.2, 0.28, "seq_mean_token_mean")
    for partial in (None, {}, {"loss_agg": "seq_mean_token_mean"}):
        assert run_loss("grpo", LOGP, OLD, ADV_VARY, MASK, partial)[0] == pytest.approx(ref, abs=1e-12)
    gspo_ref, _, _ = gspo_reference(LOGP, OLD, ADV_VARY, MASK, 0.2, 0.28)
    assert run_loss("gspo", LOGP, OLD, ADV_VARY, MASK, None)[0] == pytest.approx(gspo_ref, abs=1e-12)


def test_adv_eps_is_a_config_key_and_unknown_algorithm_keys_are_refused(tmp_path):
    """`algorithm.adv_eps` loads from YAML and reaches the estimator; a key no option declares is a KeyError."""
    from rl.algorithms import cfg_get
    from rl.config import load_config

    path = tmp_path / "job.yaml"
    path.write_text("algorithm: {advantage: grpo, policy_loss: grpo, adv_eps: 0.5}\n")
    cfg, _ = load_config(path)
    rewards, groups = torch.tensor([1.0, 0.0]), torch.tensor([0, 0])
    adv = get_advantage_estimator("grpo")(rewards, groups, torch.ones(2, 1), cfg.algorithm)
    std = math.sqrt(0.5)  # unbiased std of {1, 0}
    assert adv[:, 0].tolist() == pytest.approx([0.5 / (std + 0.5), -0.5 / (std + 0.5)], rel=1e-6)
    with pytest.raises(KeyError, match="clip_hihg"):
        cfg_get(cfg.algorithm, "clip_hihg")


def test_unknown_loss_aggregation_is_an_error():
    with pytest.raises(ValueError, match="loss aggregation 'per_token'"):
        run_loss("grpo", LOGP, OLD, ADV_VARY, MASK, {**CFG, "loss_agg": "per_token"})


def test_nll_with_sft_advantages_is_token_mean_negative_log_likelihood():
    mask = torch.tensor(MASK, dtype=torch.float64)
    adv = get_advantage_estimator("sft")(torch.zeros(4), torch.arange(4), mask, None)
    loss, _, _ = run_loss("nll", LOGP, OLD, adv.tolist(), MASK, {"loss_agg": "token_mean"})
    tokens = [LOGP[i][j] for i in range(4) for j in range(4) if MASK[i][j]]
    assert loss == pytest.approx(-sum(tokens) / len(tokens), abs=1e-12)


# ----------------------------------------------------------------------------- group-normalised advantages


def numpy_group_advantage(rewards, groups, eps=1e-6, norm_std=True):
    rewards, groups = np.asarray(rewards, dtype=np.float64), np.asarray(groups)
    out = np.zeros_like(rewards)
    for g in np.unique(groups):
        idx = np.where(groups == g)[0]
        if len(idx) < 2:
            continue
        r = rewards[idx]
        centred = r - r.mean()
        out[idx] = centred / (r.std(ddof=1) + eps) if norm_std else centred
    return out


REWARDS = [1.0, 0.0, 0.5, 0.25, 2.0, 2.0, 2.0, 3.0, 0.3, -1.0]
GROUPS = [7, 7, 3, 7, 9, 9, 9, 5, 3, 3]  # interleaved, non-contiguous ids; group 9 all equal; group 5 of one


@pytest.mark.parametrize("name", ["grpo", "gspo"])
@pytest.mark.parametrize("cfg", [None, {"norm_std": True, "adv_eps": 1e-6}, {"adv_eps": 0.5}, {"norm_std": False}])
def test_group_normalised_advantage_matches_numpy(name, cfg):
    t = 3
    mask = torch.ones(len(REWARDS), t)
    mask[0, 2] = 0
    mask[4, 1:] = 0
    adv = get_advantage_estimator(name)(torch.tensor(REWARDS), torch.tensor(GROUPS), mask, cfg)
    c = cfg or {}
    ref = numpy_group_advantage(REWARDS, GROUPS, eps=c.get("adv_eps", 1e-6), norm_std=c.get("norm_std", True))
    assert adv.shape == (len(REWARDS), t)
    np.testing.assert_allclose(adv.numpy(), ref[:, None] * mask.numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["grpo", "gspo"])
def test_equal_rewards_and_singleton_groups_give_zero_not_nan(name):
    est = get_advantage_estimator(name)
    mask = torch.ones(6, 2)
    # 0.1 is not exact in binary: the group mean differs from 0.1 by rounding, the std is ~1e-17, not 0
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.7, 0.1, 0.1])
    for cfg in (None, {"norm_std": False}):
        adv = est(rewards, torch.tensor([0, 0, 0, 1, 2, 2]), mask, cfg)
        assert torch.isfinite(adv).all()
        assert adv.abs().max() < 1e-6


def test_equal_rewards_give_zero_even_without_eps():
    adv = get_advantage_estimator("grpo")(
        torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0, 0, 0]), torch.ones(3, 2), {"adv_eps": 0.0}
    )
    assert torch.equal(adv, torch.zeros(3, 2))


def test_group_advantage_known_values():
    """Group {1, 0}: mean 0.5, unbiased std 0.7071 -> +-0.7071 (by hand)."""
    adv = get_advantage_estimator("grpo")(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), torch.ones(2, 1), {"adv_eps": 0.0})
    assert adv[:, 0].tolist() == pytest.approx([1 / math.sqrt(2), -1 / math.sqrt(2)], rel=1e-6)


# ----------------------------------------------------------------------------- registries


def test_registering_a_loss_and_an_estimator_is_one_function_and_one_name(monkeypatch):
    monkeypatch.setattr(algorithms, "POLICY_LOSSES", algorithms.POLICY_LOSSES.copy())
    monkeypatch.setattr(algorithms, "ADVANTAGE_ESTIMATORS", algorithms.ADVANTAGE_ESTIMATORS.copy())

    @algorithms.register_policy_loss("test_reinforce")
    def reinforce(logp, old_logp, advantages, mask, cfg, weights=None):
        return -(advantages * logp * mask).sum() / mask.sum(), {"custom/metric": 1.0}

    @algorithms.register_advantage_estimator("test_raw_reward")
    def raw_reward(rewards, group_ids, mask, cfg, rollouts=None):
        return rewards.unsqueeze(-1) * mask

    assert get_policy_loss("test_reinforce") is reinforce
    assert get_advantage_estimator("test_raw_reward") is raw_reward
    assert "test_reinforce" in algorithms.policy_loss_names()
    assert "test_raw_reward" in algorithms.advantage_estimator_names()
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = get_advantage_estimator("test_raw_reward")(torch.tensor([2.0, -1.0]), torch.tensor([0, 0]), mask, None)
    loss, metrics = get_policy_loss("test_reinforce")(torch.tensor([[-1.0, -2.0], [-3.0, 5.0]]), None, adv, mask, None)
    assert float(loss) == pytest.approx(-(2 * -1 + 2 * -2 + -1 * -3) / 3)
    assert metrics == {"custom/metric": 1.0}

    # and a job config naming it passes `check`
    from rl.config import JobConfig
    from rl.config_check import check_config

    cfg = JobConfig()
    cfg.algorithm.advantage, cfg.algorithm.policy_loss = "test_raw_reward", "test_reinforce"
    problems, _ = check_config(cfg)
    assert not [p for p in problems if p.startswith("algorithm.")]


def test_unknown_names_list_the_registered_ones():
    with pytest.raises(KeyError, match="gspo_token"):
        get_policy_loss("gspo-token")
    with pytest.raises(KeyError, match="grpo"):
        get_advantage_estimator("gae")
    # the MOPD estimator lives in another package and is still found by name
    assert get_advantage_estimator("mopd").__name__ == "mopd_advantage"
