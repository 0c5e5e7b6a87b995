"""A causal LM whose forward returns response-token log-probs read from hidden states, never `[T, V]` logits.

`LogprobModel` wraps a transformers model (or its peft wrapper): the decoder runs as usual, the hidden states at the
positions that predict response tokens go through `models.logprobs.hidden_logprobs` with the lm_head weight, chunk
by chunk. Wrapping the whole LM in one module also makes it FSDP2's root unit: the root all-gathers the embedding,
final norm and lm_head around its own forward, so the chunked head reads a plain (unsharded) weight.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from models.batching import PackedBatch
from models.packing import SharedPromptBatch
from models.logprobs import hidden_logprobs


@dataclass
class ResponseLogprobs:
    """Per response position, `[B, T]` over the packed batch's response columns (0 where response_mask is 0).

    logprobs `[B, T, k]`: log-probs at the k requested ids (column 0: the sampled token); entropy `[B, T]`;
    topk_ids `[B, T, topk]` (the student's own top-k, no gradient) or None; indexer loss/metrics of a DSA stage.
    """

    logprobs: torch.Tensor
    entropy: torch.Tensor
    topk_ids: torch.Tensor | None
    indexer_loss: torch.Tensor | None = None
    indexer_metrics: dict[str, float] = field(default_factory=dict)


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The language model's decoder layers (FSDP2 and activation checkpointing units), in order."""
    inner = causal_lm(model).model
    language = getattr(inner, "language_model", inner)
    return list(language.layers)


def vision_tower(model: nn.Module) -> nn.Module | None:
    """The vision encoder + projector of a vision-language model, else None."""
    return getattr(causal_lm(model).model, "visual", None)


class LogprobModel(nn.Module):
    def __init__(self, lm: nn.Module, dsa_stage: str = "none"):
        super().__init__()
        self.lm = lm
        self.dsa_stage = dsa_stage
        if dsa_stage != "none":  # for the model's whole life: a checkpointed layer recomputes in the same stage
            from models.dsa.training import set_loss_mode

            set_loss_mode(lm, dsa_stage)

    def forward(self, batch: PackedBatch | SharedPromptBatch, ids: torch.Tensor, topk: int = 0,
                entropy_grad: bool = False, chunk_rows: int | None = None) -> ResponseLogprobs:
        """`ids [B, T, k]`: the token ids whose log-probs are read at each response position. `batch`: padded
        rows (`models.batching.pack`) or one shared-prompt row (`models.packing.pack_shared`); the result is
        `[B, T, ...]` per response row either way."""
        base = causal_lm(self.lm)
        capture = nullcontext(None)
        if self.dsa_stage != "none":
            from models.dsa.training import collect_indexer_loss

            capture = collect_indexer_loss(self.lm, self.dsa_stage)
        with capture as indexer:
            hidden = base.model(**batch.model_inputs(base), use_cache=False).last_hidden_state  # [B or 1, L, H]
        b, t_len = batch.response_mask.shape
        states = batch.predicting_states(hidden)  # [B, T, H]
        rows = batch.response_mask > 0  # [B, T]: padding positions are not projected at all
        out = hidden_logprobs(states[rows], base.get_output_embeddings().weight, ids[rows], topk=topk,
                              entropy_grad=entropy_grad, chunk_rows=chunk_rows)
        k = ids.shape[-1]
        logprobs = out.logprobs.new_zeros(b, t_len, k).index_put((rows,), out.logprobs)
        entropy = out.entropy.new_zeros(b, t_len).index_put((rows,), out.entropy)
        top = None
        if out.topk_ids is not None:
            top = out.topk_ids.new_zeros(b, t_len, topk).index_put((rows,), out.topk_ids)
        return ResponseLogprobs(
            logprobs, entropy, top,
            indexer.loss if indexer is not None else None, indexer.metrics if indexer is not None else {},
        )
