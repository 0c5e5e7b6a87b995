"""MOPD: per-token reverse-KL advantages to routed teachers, the top-k agreement mask, the outcome term, the
clip, per-domain metrics, and the full MOPD loss, each against a hand computation with plain loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.chat import RenderedPrompt
from rl.algorithms import get_advantage_estimator, get_policy_loss
from rl.rollouts import Rollouts
from tasks.base import Sample

# Two prompts x G = 2 responses: rows 0, 1 are a video sample served by teacher "vid" alone; rows 2, 3 a
# reasoning sample served by "vid" (0.25) and "txt" (0.75). T = 3, right-padded.
DOMAINS = ["video", "video", "reasoning", "reasoning"]
MASK = [[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]]
STUDENT = [[-0.5, -1.2, -2.0], [-0.3, -0.9, 0.0], [-1.0, -0.4, -0.7], [-2.2, 0.0, 0.0]]
TEACHERS = {
    "vid": [[-0.2, -1.5, -1.0], [-0.3, -0.1, -8.0], [-1.4, -0.6, -0.2], [-1.0, 3.0, 3.0]],
    "txt": [[-9.0, -9.0, -9.0], [-9.0, -9.0, -9.0], [-0.6, -1.0, -0.9], [-3.0, 5.0, 5.0]],
}
WEIGHTS = {"vid": [1.0, 1.0, 0.25, 0.25], "txt": [0.0, 0.0, 0.75, 0.75]}
REWARDS = [1.0, 0.0, 0.2, 0.6]
GROUPS = [0, 0, 1, 1]
# Sampled tokens and top-k ids (k = 3 stored, mopd_topk = 2 uses the first two of each list).
RESPONSE_IDS = [[5, 6, 7], [5, 8, 0], [9, 10, 11], [12, 0, 0]]
STUDENT_TOPK = [
    [[5, 1, 2], [1, 6, 3], [1, 2, 7]],  # row 0: token 7 only third in the student's list -> outside top-2
    [[5, 2, 3], [8, 1, 2], [0, 1, 2]],
    [[9, 1, 2], [10, 1, 2], [11, 1, 2]],
    [[12, 1, 2], [0, 1, 2], [0, 1, 2]],
]
TEACHER_TOPK = {
    "vid": [
        [[1, 5, 2], [6, 2, 3], [7, 1, 2]],
        [[2, 3, 5], [8, 3, 4], [0, 1, 2]],  # row 1 token 5: third in the teacher's list -> outside top-2
        [[9, 2, 3], [10, 2, 3], [2, 3, 4]],
        [[12, 2, 3], [0, 1, 2], [0, 1, 2]],
    ],
    "txt": [
        [[1, 2, 3], [1, 2, 3], [1, 2, 3]],
        [[1, 2, 3], [1, 2, 3], [1, 2, 3]],
        [[9, 3, 4], [3, 4, 5], [3, 4, 5]],  # row 2: txt (weight 0.75) holds 9 only; vid (0.25) holds 9 and 10
        [[12, 3, 4], [0, 1, 2], [0, 1, 2]],
    ],
}
# Tokens kept by the top-2 rule, worked out by hand from the lists above (one teacher: in both top-2 lists;
# several: in the student's and in the top-2 of teachers holding most of the sample's routing weight).
#   row 0: 5 (student yes, vid yes) 6 (yes, yes) 7 (student no)            -> 1 1 0
#   row 1: 5 (vid no) 8 (yes, yes)                                        -> 0 1 .
#   row 2: 9 (vid + txt = 1.0) 10 (vid only = 0.25) 11 (student only)     -> 1 0 0
#   row 3: 12 (vid + txt)                                                 -> 1 . .
KEPT_TOP2 = [[1, 1, 0], [0, 1, 0], [1, 0, 0], [1, 0, 0]]


def make_rollouts(with_topk: bool = False) -> Rollouts:
    samples = [Sample(id=f"s{i // 2}", domain=d, messages=[{"role": "user", "content": "q"}], reference=None)
               for i, d in enumerate(DOMAINS)]
    mask = torch.tensor(MASK, dtype=torch.float32)
    r = Rollouts(
        samples=samples,
        prompts=[RenderedPrompt([1, 2], [0, 0]) for _ in samples],
        group_ids=torch.tensor(GROUPS),
        response_ids=torch.tensor(RESPONSE_IDS),
        response_mask=mask,
        sampler_logprobs=torch.tensor(STUDENT),
        truncated=torch.zeros(4, dtype=torch.bool),
        completions=["a"] * 4,
        rewards=torch.tensor(REWARDS),
        old_logprobs=torch.tensor(STUDENT),
        teacher_logprobs={k: torch.tensor(v) for k, v in TEACHERS.items()},
        teacher_weights={k: torch.tensor(v) for k, v in WEIGHTS.items()},
        loss_mask=mask.clone(),
    )
    if with_topk:
        r.student_topk_ids = torch.tensor(STUDENT_TOPK)
        r.teacher_topk_ids = {k: torch.tensor(v) for k, v in TEACHER_TOPK.items()}
    return r


def run_mopd(cfg, rollouts=None):
    rollouts = rollouts or make_rollouts(with_topk=bool(cfg.get("mopd_topk")))
    adv = get_advantage_estimator("mopd")(rollouts.rewards, rollouts.group_ids, rollouts.loss_mask, cfg, rollouts=rollouts)
    return adv, rollouts


# ----------------------------------------------------------------------------- hand references


def hand_reverse_kl_advantage(clip: float = 0.0) -> list[list[float]]:
    out = [[0.0] * 3 for _ in range(4)]
    for i in range(4):
        for t in range(3):
            if not MASK[i][t]:
                continue
            a = sum(WEIGHTS[k][i] * (TEACHERS[k][i][t] - STUDENT[i][t]) for k in TEACHERS)
            if clip:
                a = max(-clip, min(clip, a))
            out[i][t] = a
    return out


def hand_outcome_advantage(eps: float = 1e-6) -> list[float]:
    out = []
    for i in range(4):
        members = [REWARDS[j] for j in range(4) if GROUPS[j] == GROUPS[i]]
        mean = sum(members) / len(members)
        std = math.sqrt(sum((x - mean) ** 2 for x in members) / (len(members) - 1))
        out.append((REWARDS[i] - mean) / (std + eps))
    return out


# ----------------------------------------------------------------------------- advantages


def test_reverse_kl_advantage_with_two_teachers_and_routing_weights():
    adv, rollouts = run_mopd({})
    np.testing.assert_allclose(adv.numpy(), hand_reverse_kl_advantage(), atol=1e-6)
    # a worked entry: row 2 token 0 = 0.25 * (-1.4 + 1.0) + 0.75 * (-0.6 + 1.0) = -0.1 + 0.3 = 0.2
    assert float(adv[2, 0]) == pytest.approx(0.2, abs=1e-6)
    # no top-k: the loss mask is left alone
    assert torch.equal(rollouts.loss_mask, torch.tensor(MASK, dtype=torch.float32))


def test_padded_positions_get_zero_advantage_whatever_the_teacher_says():
    adv, _ = run_mopd({})
    assert torch.all(adv[torch.tensor(MASK) == 0] == 0)


def test_topk_agreement_removes_tokens_from_the_loss_mask():
    adv, rollouts = run_mopd({"mopd_topk": 2})
    assert rollouts.loss_mask.tolist() == KEPT_TOP2
    # the advantages themselves are the plain reverse-KL values (masking happens through loss_mask)
    np.testing.assert_allclose(adv.numpy(), hand_reverse_kl_advantage(), atol=1e-6)
    kept = sum(map(sum, KEPT_TOP2))
    assert rollouts.metrics["mopd/topk_kept_frac"] == pytest.approx(kept / sum(map(sum, MASK)))


def test_topk_keeps_an_earlier_loss_mask_zero():
    rollouts = make_rollouts(with_topk=True)
    rollouts.loss_mask[0, 0] = 0  # e.g. dropped by the mismatch rule before the estimator ran
    run_mopd({"mopd_topk": 2}, rollouts)
    expected = [row[:] for row in KEPT_TOP2]
    expected[0][0] = 0
    assert rollouts.loss_mask.tolist() == expected


def test_topk_with_k_three_keeps_the_tokens_third_in_a_list():
    _, rollouts = run_mopd({"mopd_topk": 3})
    # row 0 token 7 is third for the student, row 1 token 5 third for vid: both kept now
    assert rollouts.loss_mask[0, 2] == 1 and rollouts.loss_mask[1, 0] == 1
    assert rollouts.loss_mask[2, 2] == 0  # token 11 is in no teacher's list at all


def test_topk_without_topk_ids_is_an_error_naming_the_teacher():
    rollouts = make_rollouts(with_topk=True)
    del rollouts.teacher_topk_ids["txt"]
    with pytest.raises(ValueError, match="txt"):
        run_mopd({"mopd_topk": 2}, rollouts)


def test_outcome_weight_adds_group_normalised_outcome_advantage():
    w = 0.5
    adv, _ = run_mopd({"outcome_weight": w})
    kl = hand_reverse_kl_advantage()
    outcome = hand_outcome_advantage()
    expected = [[(kl[i][t] + w * outcome[i]) * MASK[i][t] for t in range(3)] for i in range(4)]
    np.testing.assert_allclose(adv.numpy(), expected, atol=1e-5)
    # group {1, 0}: +-1/sqrt(2) outcome advantage
    assert outcome[0] == pytest.approx(1 / math.sqrt(2), rel=1e-5)


def test_adv_clip_bounds_the_reverse_kl_advantage():
    adv, _ = run_mopd({"mopd_adv_clip": 0.5})
    expected = hand_reverse_kl_advantage(clip=0.5)
    np.testing.assert_allclose(adv.numpy(), expected, atol=1e-6)
    assert float(adv.abs().max()) == pytest.approx(0.5)
    # row 0 token 2: teacher -1.0 vs student -2.0 -> +1.0 unclipped, 0.5 clipped
    assert float(adv[0, 2]) == pytest.approx(0.5)


def test_reverse_kl_metrics_per_domain():
    _, rollouts = run_mopd({})
    sums, counts = {}, {}
    for i, d in enumerate(DOMAINS):
        for t in range(3):
            if MASK[i][t]:
                kl = sum(WEIGHTS[k][i] * (STUDENT[i][t] - TEACHERS[k][i][t]) for k in TEACHERS)
                sums[d] = sums.get(d, 0.0) + kl
                counts[d] = counts.get(d, 0) + 1
    for d in ("video", "reasoning"):
        assert rollouts.metrics[f"mopd/reverse_kl/{d}"] == pytest.approx(sums[d] / counts[d], abs=1e-6)
    assert rollouts.metrics["mopd/reverse_kl"] == pytest.approx(sum(sums.values()) / sum(counts.values()), abs=1e-6)


def test_mopd_needs_old_logprobs_and_teachers():
    rollouts = make_rollouts()
    rollouts.old_logprobs = None
    with pytest.raises(ValueError, match="old_logprobs"):
        run_mopd({}, rollouts)
    rollouts = make_rollouts()
    rollouts.teacher_logprobs = {}
    with pytest.raises(ValueError, match="teacher"):
        run_mopd({}, rollouts)
    with pytest.raises(ValueError):
        get_advantage_estimator("mopd")(torch.zeros(4), torch.zeros(4), torch.ones(4, 3), {}, rollouts=None)


# ----------------------------------------------------------------------------- the full MOPD loss

# The current policy's log-probs, shifted from pi_old. With the top-2 mask, row 0's kept tokens have mean log-ratio
# 0.3 -> s = 1.35 > 1.28: its token of positive advantage is clipped, its token of negative advantage is not.
# Without it, row 0 also counts token 2 (shift 5.0) and its ratio is far above the range.
DELTA = [[0.4, 0.2, 5.0], [0.1, -0.1, 0.0], [-0.05, 0.02, 0.1], [0.15, 0.0, 0.0]]
LOGP = [[STUDENT[i][t] + DELTA[i][t] for t in range(3)] for i in range(4)]


def hand_mopd_loss(loss_mask, token_ratio: bool, clip_low=0.2, clip_high=0.28):
    """Loss and d loss / d logp of the per-token clipped objective on the reverse-KL advantages, by loops;
    aggregation: each sequence's token mean over loss_mask, then the mean over sequences with tokens."""
    adv = hand_reverse_kl_advantage()
    loss, grad, rows = 0.0, [[0.0] * 3 for _ in range(4)], []
    for i in range(4):
        idx = [t for t in range(3) if loss_mask[i][t]]
        if idx:
            rows.append((i, idx))
    for i, idx in rows:
        s = math.exp(sum(LOGP[i][t] - STUDENT[i][t] for t in idx) / len(idx))
        for t in idx:
            r = math.exp(LOGP[i][t] - STUDENT[i][t]) if token_ratio else s
            a = adv[i][t]
            clipped = min(max(r, 1 - clip_low), 1 + clip_high) * a
            if clipped < r * a:
                loss -= clipped / (len(idx) * len(rows))
            else:
                loss -= r * a / (len(idx) * len(rows))
                # d(s_it)/d logp_it = s_it for both GRPO's token ratio and GSPO-token's sg[s] * pi / sg[pi]
                grad[i][t] = -r * a / (len(idx) * len(rows))
    return loss, grad


@pytest.mark.parametrize("loss_name,token_ratio", [("gspo_token", False), ("grpo", True)])
@pytest.mark.parametrize("topk", [0, 2])
def test_full_mopd_loss_matches_hand_computation(loss_name, token_ratio, topk):
    cfg = {"clip_low": 0.2, "clip_high": 0.28, "mopd_topk": topk}
    adv, rollouts = run_mopd(cfg)
    logp = torch.tensor(LOGP, requires_grad=True)
    loss, _ = get_policy_loss(loss_name)(logp, rollouts.old_logprobs, adv, rollouts.loss_mask, cfg)
    loss.backward()
    expected_mask = KEPT_TOP2 if topk else MASK
    ref_loss, ref_grad = hand_mopd_loss(expected_mask, token_ratio)
    assert float(loss.detach()) == pytest.approx(ref_loss, abs=1e-5)
    np.testing.assert_allclose(logp.grad.numpy(), ref_grad, atol=1e-5)


def test_full_mopd_loss_known_value_on_one_token():
    """One response of one token, one teacher: A = log p_T - log pi_old = -0.5 - (-1.0) = 0.5; logp = old
    -> ratio 1, loss = -0.5; d loss / d logp = -0.5 (the student moves toward the teacher's liking)."""
    sample = Sample(id="x", domain="reasoning", messages=[{"role": "user", "content": "q"}], reference=None)
    r = Rollouts(
        samples=[sample], prompts=[RenderedPrompt([1], [0])], group_ids=torch.tensor([0]),
        response_ids=torch.tensor([[4]]), response_mask=torch.ones(1, 1), sampler_logprobs=torch.tensor([[-1.0]]),
        truncated=torch.zeros(1, dtype=torch.bool), completions=["4"], rewards=torch.tensor([1.0]),
        old_logprobs=torch.tensor([[-1.0]]), teacher_logprobs={"t": torch.tensor([[-0.5]])},
        teacher_weights={"t": torch.tensor([1.0])}, loss_mask=torch.ones(1, 1),
    )
    adv = get_advantage_estimator("mopd")(r.rewards, r.group_ids, r.loss_mask, {}, rollouts=r)
    logp = torch.tensor([[-1.0]], requires_grad=True)
    loss, _ = get_policy_loss("gspo_token")(logp, r.old_logprobs, adv, r.loss_mask, {})
    loss.backward()
    assert float(adv) == pytest.approx(0.5)
    assert float(loss.detach()) == pytest.approx(-0.5)
    assert float(logp.grad) == pytest.approx(-0.5)
    assert r.metrics["mopd/reverse_kl/reasoning"] == pytest.approx(-0.5)


def test_group_baseline_is_the_leave_one_out_mean_per_position():
    from mopd.estimator import group_position_baseline

    adv = torch.tensor([[1.0, 2.0, 5.0], [3.0, 4.0, 0.0], [5.0, 0.0, 0.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    groups = torch.tensor([0, 0, 0, 1])
    base = group_position_baseline(adv, groups, mask)
    expected = torch.tensor([
        [(3 + 5) / 2, 4.0, 0.0],      # position 2: no other response of group 0 has a token there
        [(1 + 5) / 2, 2.0, 0.0],
        [(1 + 3) / 2, 0.0, 0.0],        # padding gets no baseline
        [0.0, 0.0, 0.0],             # a group of one has no baseline
    ])
    torch.testing.assert_close(base, expected)
