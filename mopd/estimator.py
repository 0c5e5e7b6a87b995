"""MOPD advantage: per-token reverse KL to the routed teacher(s), optionally plus an outcome advantage.

For response token y_t of a sample routed to teachers k with weights w_k (summing to 1):

    A_t = sum_k w_k * (log p_k(y_t | view_k) - log pi_old(y_t))        (no gradient: a fixed advantage)

Its expectation under the student is minus the reverse KL, so a policy-gradient step on it lowers
KL(pi || p_teacher) token by token. Options (cfg keys, read with `rl.algorithms.cfg_get`):
- `mopd_topk` (0 = off): keep only tokens that are inside both the teacher's and the student's top-k (the
  Keye-VL-2.0 rule); the others leave `rollouts.loss_mask`.
- `mopd_adv_clip` (0 = off): clip A_t to [-c, c] (tokens the teacher finds impossible give -inf-like values).
- `mopd_baseline` ("none" | "group"): subtract the leave-one-out mean advantage of the prompt's other responses
  at the same position (variance reduction; the expected gradient is unchanged where the prefix is shared).
- `outcome_weight` (0 = off): add `w * group-normalised outcome reward advantage` (MiMo-V2-Flash's MOPD).
- `mopd_token_weight` (default 1): scale of the sampled-token reverse-KL advantage; 0 leaves the distillation
  signal to a dense logit loss (`mopd.dense`), which on tiny models from a weak start learned faster without it.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from rl.algorithms import cfg_get, group_normalized_advantage, register_advantage_estimator


def topk_agreement(response_ids: torch.Tensor, student_topk: torch.Tensor, teacher_topk: torch.Tensor) -> torch.Tensor:
    """1 where the sampled token is in both top-k sets: `[B, T]`, `[B, T, k]`, `[B, T, k']` -> `[B, T]` float."""
    token = response_ids.unsqueeze(-1)
    in_student = (student_topk == token).any(-1)
    in_teacher = (teacher_topk == token).any(-1)
    return (in_student & in_teacher).float()


@register_advantage_estimator("mopd", uses_old_logprobs=True)
def mopd_advantage(rewards, group_ids, mask, cfg=None, rollouts=None) -> torch.Tensor:
    """`[B, T]` reverse-KL advantages from `rollouts.teacher_logprobs` / `teacher_weights` and
    `rollouts.old_logprobs` (the trainer's log-probs before the update). See the module docstring."""
    if rollouts is None or rollouts.old_logprobs is None:
        raise ValueError("the mopd estimator needs rollouts with old_logprobs and teacher_logprobs")
    if not rollouts.teacher_logprobs:
        raise ValueError("the mopd estimator found no teacher log-probs: configure at least one teacher")
    student = rollouts.old_logprobs
    advantages = torch.zeros_like(student)
    topk = int(cfg_get(cfg, "mopd_topk"))
    agreement = torch.zeros_like(student) if topk else None
    for name, teacher_logp in rollouts.teacher_logprobs.items():
        weight = rollouts.teacher_weights[name].to(student.dtype).unsqueeze(-1)  # [B, 1]
        advantages = advantages + weight * (teacher_logp - student)
        if topk:
            if rollouts.student_topk_ids is None or name not in rollouts.teacher_topk_ids:
                raise ValueError(f"mopd_topk={topk} needs student and teacher top-k ids (teacher {name!r})")
            both = topk_agreement(
                rollouts.response_ids, rollouts.student_topk_ids[..., :topk], rollouts.teacher_topk_ids[name][..., :topk]
            )
            agreement = agreement + weight * both
    clip = float(cfg_get(cfg, "mopd_adv_clip"))
    if clip > 0:
        advantages = advantages.clamp(-clip, clip)
    if cfg_get(cfg, "mopd_baseline") == "group":
        advantages = advantages - group_position_baseline(advantages, group_ids, mask)
    if topk:
        keep = (agreement > 0.5).float()
        base = rollouts.loss_mask if rollouts.loss_mask is not None else mask
        rollouts.loss_mask = base * keep
        rollouts.metrics["mopd/topk_kept_frac"] = float((keep * mask).sum() / mask.sum().clamp(min=1))
    advantages = advantages * float(cfg_get(cfg, "mopd_token_weight"))
    outcome_weight = float(cfg_get(cfg, "outcome_weight"))
    if outcome_weight:
        advantages = advantages + outcome_weight * group_normalized_advantage(rewards, group_ids, mask, cfg)
    rollouts.metrics.update(reverse_kl_by_domain(rollouts))
    return advantages * mask


def group_position_baseline(advantages: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Leave-one-out mean of the other responses of the same prompt at the same token position: `[B, T]`.

    The G responses of a prompt share the prompt, so at position 0 (and wherever they still share the prefix) this
    is a state baseline: subtracting it keeps the expected gradient and removes the part of the reverse KL that
    every sample pays, which otherwise pushes all sampled tokens down at once. 0 where no other response has a token
    and on padding.
    """
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inverse.max()) + 1
    masked = advantages * mask
    totals = torch.zeros(n_groups, advantages.shape[1], dtype=advantages.dtype, device=advantages.device).index_add_(0, inverse, masked)
    counts = torch.zeros(n_groups, advantages.shape[1], dtype=advantages.dtype, device=advantages.device).index_add_(0, inverse, mask)
    others = (counts[inverse] - mask).clamp(min=0)
    baseline = torch.where(others > 0, (totals[inverse] - masked) / others.clamp(min=1), torch.zeros_like(advantages))
    return baseline * mask


def reverse_kl_by_domain(rollouts) -> dict[str, float]:
    """Token-mean estimate of KL(student || routed teacher) per domain: mean of log pi - log p_teacher."""
    per_token = torch.zeros_like(rollouts.old_logprobs)
    for name, teacher_logp in rollouts.teacher_logprobs.items():
        weight = rollouts.teacher_weights[name].to(per_token.dtype).unsqueeze(-1)
        per_token = per_token + weight * (rollouts.old_logprobs - teacher_logp)
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, float] = defaultdict(float)
    mask = rollouts.response_mask
    for i, domain in enumerate(rollouts.domains):
        sums[domain] += float((per_token[i] * mask[i]).sum())
        counts[domain] += float(mask[i].sum())
    out = {f"mopd/reverse_kl/{d}": sums[d] / max(counts[d], 1.0) for d in sums}
    total = sum(counts.values())
    out["mopd/reverse_kl"] = sum(sums.values()) / max(total, 1.0)
    return out
