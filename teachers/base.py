"""The teacher interface: dense log-probs of the student's sampled tokens, in the teacher's own view."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TeacherScores:
    """`logprobs [B, T]` of the given response tokens (0 past each response's end);
    `topk_ids` / `topk_logprobs [B, T, k]` when top-k was asked for, else None."""

    logprobs: torch.Tensor
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None


def combine_scores(parts: list[TeacherScores]) -> TeacherScores:
    """Concatenate shard results along the batch, right-padding the token axis to the longest shard."""
    t_len = max(p.logprobs.shape[1] for p in parts)

    def cat(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
        if tensors[0] is None:
            return None
        padded = []
        for x in tensors:
            pad = [0, 0] * (x.dim() - 2) + [0, t_len - x.shape[1]]
            padded.append(torch.nn.functional.pad(x, pad))
        return torch.cat(padded)

    return TeacherScores(
        cat([p.logprobs for p in parts]), cat([p.topk_ids for p in parts]), cat([p.topk_logprobs for p in parts])
    )
