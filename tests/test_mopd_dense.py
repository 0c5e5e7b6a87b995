"""The dense MOPD term (`teacher_kl`): reverse KL to each routed teacher over its top-k tokens plus a tail bucket,
against an exact full-vocabulary KL and against plain-loop hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from models.chat import RenderedPrompt
from rl.algorithms import get_logit_loss
from rl.rollouts import Rollouts
from tasks.base import Sample

V = 7


def rollouts_with(teacher_ids: dict, teacher_lps: dict, weights: dict, mask) -> Rollouts:
    b, t = mask.shape
    samples = [Sample(id=f"s{i}", domain="d", messages=[{"role": "user", "content": "q"}], reference=None) for i in range(b)]
    return Rollouts(
        samples=samples, prompts=[RenderedPrompt([1], [0]) for _ in samples], group_ids=torch.arange(b),
        response_ids=torch.zeros(b, t, dtype=torch.long), response_mask=mask, sampler_logprobs=torch.zeros(b, t),
        truncated=torch.zeros(b, dtype=torch.bool), completions=[""] * b,
        teacher_topk_ids=teacher_ids, teacher_topk_logprobs=teacher_lps, teacher_weights=weights,
    )


def student_at_topk(logits: torch.Tensor, rollouts: Rollouts) -> dict[str, torch.Tensor]:
    """What the policy hands a logit loss: the student's log-probs at each teacher's top-k ids `[B, T, k]`."""
    logp = torch.log_softmax(logits, -1)
    return {n: logp.gather(-1, ids) for n, ids in rollouts.teacher_topk_ids.items()}


def test_with_the_whole_vocabulary_it_is_the_exact_reverse_kl_and_its_gradient():
    torch.manual_seed(0)
    student_logits = torch.randn(2, 3, V, dtype=torch.float64, requires_grad=True)
    teacher_logp = torch.log_softmax(torch.randn(2, 3, V, dtype=torch.float64), -1)
    ids = torch.stack([torch.randperm(V) for _ in range(6)]).view(2, 3, V)  # all tokens, in any order
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    r = rollouts_with({"t": ids}, {"t": teacher_logp.gather(-1, ids).float()}, {"t": torch.ones(2)}, mask)
    loss, metrics = get_logit_loss("teacher_kl")(student_at_topk(student_logits, r), r, mask, None)

    reference_logits = student_logits.detach().clone().requires_grad_(True)
    p = torch.log_softmax(reference_logits, -1)
    exact = (p.exp() * (p - teacher_logp)).sum(-1)
    expected = (exact * mask).sum() / mask.sum()
    expected.backward()
    loss.backward()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert metrics["mopd/teacher_kl"] == pytest.approx(expected.item(), abs=1e-5)
    assert torch.allclose(student_logits.grad, reference_logits.grad, atol=1e-5)
    assert student_logits.grad[0, 2].abs().max() == 0  # padding contributes nothing


def test_top2_with_a_tail_bucket_and_two_weighted_teachers_matches_a_loop():
    logits = [[[2.0, 1.0, 0.0, -1.0, 0.5, 0.0, 0.0]], [[0.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0]]]
    student_logits = torch.tensor(logits)
    ids = {"a": torch.tensor([[[0, 4]], [[2, 1]]]), "b": torch.tensor([[[1, 3]], [[2, 5]]])}
    lps = {"a": torch.tensor([[[-0.5, -1.5]], [[-0.2, -3.0]]]), "b": torch.tensor([[[-0.1, -4.0]], [[-1.0, -1.0]]])}
    weights = {"a": torch.tensor([1.0, 0.25]), "b": torch.tensor([0.0, 0.75])}
    mask = torch.ones(2, 1)
    r = rollouts_with(ids, lps, weights, mask)
    loss, _ = get_logit_loss("teacher_kl")(student_at_topk(student_logits, r), r, mask, None)

    total = 0.0
    for i in range(2):
        z = logits[i][0]
        norm = math.log(sum(math.exp(x) for x in z))
        logp = [x - norm for x in z]
        for name in ("a", "b"):
            w = float(weights[name][i])
            if w == 0:
                continue
            s = [logp[j] for j in ids[name][i, 0].tolist()]
            t = lps[name][i, 0].tolist()
            s_tail = math.log(1 - sum(math.exp(x) for x in s))
            t_tail = math.log(1 - sum(math.exp(x) for x in t))
            kl = sum(math.exp(a) * (a - b) for a, b in zip(s, t)) + math.exp(s_tail) * (s_tail - t_tail)
            total += w * kl
    assert loss.item() == pytest.approx(total / 2, rel=1e-5)


def test_it_is_zero_when_the_student_matches_the_teacher_on_its_top_k_and_tail():
    logits = torch.log_softmax(torch.randn(1, 2, V), -1)
    ids = logits.topk(3, dim=-1).indices
    mask = torch.ones(1, 2)
    r = rollouts_with({"t": ids}, {"t": logits.gather(-1, ids)}, {"t": torch.ones(1)}, mask)
    loss, _ = get_logit_loss("teacher_kl")(student_at_topk(logits, r), r, mask, None)
    assert abs(loss.item()) < 1e-6


def test_a_routed_teacher_without_top_k_is_an_error_naming_it():
    mask = torch.ones(1, 1)
    r = rollouts_with({}, {}, {"video_expert": torch.ones(1)}, mask)
    with pytest.raises(ValueError, match="video_expert.*topk > 0"):
        get_logit_loss("teacher_kl")({}, r, mask, None)


def test_check_reports_teacher_kl_without_teacher_topk(tmp_path):
    from rl.config import load_config
    from rl.config_check import check_config

    path = tmp_path / "job.yaml"
    path.write_text(
        "teachers:\n  - {name: vid, path: x, domains: [video], topk: 0}\n"
        "algorithm: {logit_losses: {teacher_kl: 1.0, not_a_loss: 1.0}}\n"
    )
    import pytest

    from rl.config_loader import ConfigError

    with pytest.raises(ConfigError) as err:  # a cross-field rule: the loader refuses it, so `train` does too
        load_config(str(path), [])
    assert "teacher_kl needs teachers with topk > 0" in str(err.value) and "vid" in str(err.value)
    assert "logit_losses.not_a_loss: unknown logit loss 'not_a_loss'" in str(err.value)
    cfg, _ = load_config(str(path), ["teachers.0.topk=4", "algorithm.logit_losses={teacher_kl: 1.0}"])
    assert not [p for p in check_config(cfg)[0] if "logit_losses" in p]
