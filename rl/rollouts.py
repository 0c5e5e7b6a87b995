"""`Rollouts`: the one record that flows through a training step; each stage fills its own fields.

All tensors are over response tokens, right-padded: `[B, T]` with `response_mask [B, T]` (1 = real token).
B counts responses (G per prompt, grouped by `group_ids`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from models.chat import RenderedPrompt
from tasks.base import Sample


@dataclass
class Rollouts:
    # prompt side (one entry per response: a prompt's G responses repeat its sample)
    samples: list[Sample]
    prompts: list[RenderedPrompt]
    group_ids: torch.Tensor  # [B] long, same id for the G responses of one prompt
    # sampler side
    response_ids: torch.Tensor  # [B, T] long
    response_mask: torch.Tensor  # [B, T] float
    sampler_logprobs: torch.Tensor  # [B, T] float, the rollout engine's log-probs of the sampled tokens
    truncated: torch.Tensor  # [B] bool, hit max_new_tokens without end-of-turn
    completions: list[str]  # decoded responses
    # later stages
    rewards: torch.Tensor | None = None  # [B]
    reward_invalid: torch.Tensor | None = None  # [B] bool (unparsable answer, bad tool JSON, empty ...)
    old_logprobs: torch.Tensor | None = None  # [B, T] the trainer's log-probs before the update (pi_old)
    student_topk_ids: torch.Tensor | None = None  # [B, T, k] the trainer's top-k token ids (MOPD top-k mask)
    ref_logprobs: torch.Tensor | None = None  # [B, T] reference model (KL penalty)
    teacher_logprobs: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [B, T]
    teacher_topk_ids: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [B, T, k]
    teacher_topk_logprobs: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [B, T, k]
    teacher_weights: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [B] routing weight
    loss_mask: torch.Tensor | None = None  # [B, T] response_mask after filters / mismatch masking
    token_weights: torch.Tensor | None = None  # [B, T] importance weights against the sampler (TIS)
    advantages: torch.Tensor | None = None  # [B, T]
    metrics: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_generations(cls, samples, prompts, group_ids: torch.Tensor, gens, pad_id: int, decode) -> Rollouts:
        """The sampler side of a step: responses right-padded to the longest, with their mask and log-probs."""
        b = len(samples)
        t_len = max(1, max(len(r) for r in gens.response_ids))
        ids = torch.full((b, t_len), pad_id, dtype=torch.long)
        mask = torch.zeros(b, t_len)
        sampler_lp = torch.zeros(b, t_len)
        for i, (r, lp) in enumerate(zip(gens.response_ids, gens.logprobs)):
            if r:
                ids[i, : len(r)] = torch.tensor(r)
                mask[i, : len(r)] = 1
                sampler_lp[i, : len(r)] = torch.tensor(lp)
        return cls(samples=samples, prompts=prompts, group_ids=group_ids, response_ids=ids, response_mask=mask,
                   sampler_logprobs=sampler_lp, truncated=torch.tensor(gens.truncated, dtype=torch.bool),
                   completions=[decode(r) for r in gens.response_ids])

    def unpadded_responses(self) -> list[list[int]]:
        """Each row's response token ids without the right padding."""
        lengths = self.response_mask.sum(-1).long().tolist()
        return [row[:n] for row, n in zip(self.response_ids.tolist(), lengths)]

    def add_teacher(self, name: str, weights: torch.Tensor, rows: list[int], scores) -> None:
        """A teacher's scores of `rows` (TeacherScores, or None when no row is routed to it), zero elsewhere:
        `teacher_logprobs[name] [B, T]` and, when it returns them, its top-k ids and log-probs `[B, T, k]`."""
        b, t_len = self.response_ids.shape
        device = self.response_ids.device
        self.teacher_weights[name] = weights.to(device)
        full = torch.zeros(b, t_len, device=device)
        self.teacher_logprobs[name] = full
        if scores is None:
            return
        n = min(scores.logprobs.shape[1], t_len)
        full[rows, :n] = scores.logprobs[:, :n].to(device)
        if scores.topk_ids is not None:
            k = scores.topk_ids.shape[-1]
            ids = torch.zeros(b, t_len, k, dtype=torch.long, device=device)
            lps = torch.zeros(b, t_len, k, device=device)
            ids[rows, :n] = scores.topk_ids[:, :n].to(device)
            lps[rows, :n] = scores.topk_logprobs[:, :n].to(device)
            self.teacher_topk_ids[name] = ids
            self.teacher_topk_logprobs[name] = lps

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def domains(self) -> list[str]:
        return [s.domain for s in self.samples]

    def to(self, device: torch.device | str) -> Rollouts:
        """The record with every tensor on `device` (a no-op for tensors already there)."""

        def move(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                return value.to(device)
            if isinstance(value, dict):
                return {k: move(v) for k, v in value.items()}
            return value

        moved = {name: move(getattr(self, name)) for name in self.__dataclass_fields__ if name != "metrics"}
        return Rollouts(**moved, metrics=self.metrics)

    def select(self, index: list[int] | torch.Tensor) -> Rollouts:
        """A sub-batch (micro-batching): every per-response field indexed the same way."""
        idx = torch.as_tensor(index, dtype=torch.long)
        pick = idx.tolist()
        idx = idx.to(self.response_ids.device)

        def sub(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                return value[idx]
            if isinstance(value, dict):
                return {k: sub(v) for k, v in value.items()}
            if isinstance(value, list):
                return [value[i] for i in pick]
            return value

        return Rollouts(**{name: sub(getattr(self, name)) if name != "metrics" else {} for name in self.__dataclass_fields__})
