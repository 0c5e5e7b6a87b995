"""Log-probs from hidden states and the lm_head weight (interim plain version; replaced by the chunked one)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class HiddenLogprobs:
    logprobs: torch.Tensor  # [N, k] float32
    entropy: torch.Tensor  # [N] float32
    topk_ids: torch.Tensor | None  # [N, topk] long


def hidden_logprobs(hidden, weight, ids, *, temperature=1.0, topk=0, entropy_grad=False, chunk_rows=None):
    logits = (hidden @ weight.T).float() / temperature
    logp = torch.log_softmax(logits, -1)
    ent = -(logp.exp() * logp).sum(-1)
    if not entropy_grad:
        ent = ent.detach()
    top = logits.detach().topk(topk, -1).indices if topk else None
    return HiddenLogprobs(logp.gather(-1, ids), ent, top)
