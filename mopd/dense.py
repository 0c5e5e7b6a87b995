"""Dense MOPD term: the reverse KL from the student to the routed teacher over the teacher's top-k tokens.

The sampled-token advantage (`mopd.estimator`) sees one token per position; a teacher that also returns its top-k
log-probs gives the whole shape of its distribution there. At each response position, with S the teacher's top-k
ids, the student's and teacher's distributions are coarsened to the k tokens of S plus one *tail* bucket (all other
tokens), and

    KL_t = sum_{v in S} p(v) (log p(v) - log q(v)) + p(tail) (log p(tail) - log q(tail))

with p the student (with gradient) and q the teacher. The coarsening makes it exact where k covers the vocabulary
and a lower bound of the full reverse KL otherwise (KL never grows by merging outcomes); top-k log-probs are what
serving engines return. Several teachers on one sample are weighted by their routing weights.

`teacher_fkl` is the forward direction, KL(q || p) on the same buckets (cross-entropy to the teacher's top-k on the
student's own prefixes, GKD's beta = 0). Reverse KL is mode-seeking but its gradient, p (log p/q - KL) per logit,
vanishes where the student is confidently wrong (p ~ 1 on a token the teacher rules out); the forward gradient
p - q does not, which is what a weak student far from its teachers needs.
"""

from __future__ import annotations

import torch

from rl.algorithms import masked_mean, register_logit_loss

# log(1 - total probability) is clamped here: a top-k that already holds all the mass has an empty tail.
_TAIL_FLOOR = 1e-6


def _tail_logprob(logprobs: torch.Tensor) -> torch.Tensor:
    """log(1 - sum_k exp(logprobs)) over the last dim, floored: `[..., k]` -> `[...]`."""
    inside = logprobs.exp().sum(-1)
    return torch.log((1.0 - inside).clamp(min=_TAIL_FLOOR))


def bucket_reverse_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(student || teacher) over k tokens plus the tail bucket: log-probs `[..., k]` -> `[...]`."""
    s_tail, t_tail = _tail_logprob(student), _tail_logprob(teacher)
    inside = (student.exp() * (student - teacher)).sum(-1)
    return inside + s_tail.exp() * (s_tail - t_tail)


def bucket_forward_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) over k tokens plus the tail bucket: log-probs `[..., k]` -> `[...]`."""
    return bucket_reverse_kl(teacher, student)


@register_logit_loss("teacher_kl", needs_teacher_topk=True)
def teacher_topk_kl(student_at_topk: dict[str, torch.Tensor], rollouts, mask: torch.Tensor, cfg=None):
    """Token-mean over `mask [B, T]` of the routing-weighted bucket reverse KL to each teacher's top-k:
    `student_at_topk[teacher] [B, T, k]` are the student's log-probs at `rollouts.teacher_topk_ids[teacher]`,
    compared with `rollouts.teacher_topk_logprobs[teacher]`; weights `rollouts.teacher_weights [B]`."""
    return _teacher_topk_divergence(student_at_topk, rollouts, mask, bucket_reverse_kl, "teacher_kl")


@register_logit_loss("teacher_fkl", needs_teacher_topk=True)
def teacher_topk_forward_kl(student_at_topk: dict[str, torch.Tensor], rollouts, mask: torch.Tensor, cfg=None):
    """As `teacher_kl`, in the forward direction KL(teacher || student)."""
    return _teacher_topk_divergence(student_at_topk, rollouts, mask, bucket_forward_kl, "teacher_fkl")


def _teacher_topk_divergence(student_at_topk, rollouts, mask, divergence, name_of_loss: str):
    names = [n for n, w in rollouts.teacher_weights.items() if bool((w > 0).any())]
    missing = [n for n in names if n not in rollouts.teacher_topk_ids or n not in student_at_topk]
    if missing:
        raise ValueError(f"logit loss {name_of_loss!r} needs top-k log-probs from teacher(s) {missing}: set their topk > 0")
    per_token = torch.zeros_like(mask, dtype=torch.float32)
    for name in names:
        student = student_at_topk[name]
        kl = divergence(student, rollouts.teacher_topk_logprobs[name].to(student.dtype))
        per_token = per_token + rollouts.teacher_weights[name].to(kl.dtype).unsqueeze(-1) * kl
    if not names:
        per_token = per_token + 0.0 * sum(v.sum() for v in student_at_topk.values())
    loss = masked_mean(per_token, mask)
    return loss, {f"mopd/{name_of_loss}": float(loss.detach())}
