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

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def domains(self) -> list[str]:
        return [s.domain for s in self.samples]

    def select(self, index: list[int] | torch.Tensor) -> Rollouts:
        """A sub-batch (micro-batching): every per-response field indexed the same way."""
        idx = torch.as_tensor(index, dtype=torch.long)
        pick = idx.tolist()

        def sub(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                return value[idx]
            if isinstance(value, dict):
                return {k: sub(v) for k, v in value.items()}
            if isinstance(value, list):
                return [value[i] for i in pick]
            return value

        return Rollouts(**{name: sub(getattr(self, name)) if name != "metrics" else {} for name in self.__dataclass_fields__})
