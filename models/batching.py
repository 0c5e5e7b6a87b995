"""Pack prompts and responses into one padded batch and read response-token log-probs from a model.

Layout (verl's): prompts left-padded to P, responses right-padded to T, so response token t of every row sits
in column P + t. Logits at column P + t - 1 predict it, which lets every scorer (trainer, teacher, sampler check)
slice `[B, T]` log-probs the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.chat import RenderedPrompt


@dataclass
class PackedBatch:
    """input_ids / attention_mask / mm_token_type_ids `[B, P+T]`; response_mask `[B, T]`; video tensors or None."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mm_token_type_ids: torch.Tensor
    response_mask: torch.Tensor
    prompt_len: int
    pixel_values_videos: torch.Tensor | None
    video_grid_thw: torch.Tensor | None

    def model_inputs(self) -> dict:
        kwargs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.video_grid_thw is not None:
            kwargs.update(
                mm_token_type_ids=self.mm_token_type_ids,
                pixel_values_videos=self.pixel_values_videos,
                video_grid_thw=self.video_grid_thw,
            )
        return kwargs


def pack(prompts: list[RenderedPrompt], responses: list[list[int]], pad_id: int) -> PackedBatch:
    """Left-pad prompts, right-pad responses (which may be empty lists), concatenate."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    p_len = max(len(p.input_ids) for p in prompts)
    t_len = max(1, max(len(r) for r in responses))
    b = len(prompts)
    ids = torch.full((b, p_len + t_len), pad_id, dtype=torch.long)
    mask = torch.zeros((b, p_len + t_len), dtype=torch.long)
    types = torch.zeros((b, p_len + t_len), dtype=torch.long)
    resp_mask = torch.zeros((b, t_len), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        n = len(p.input_ids)
        ids[i, p_len - n : p_len] = torch.tensor(p.input_ids)
        types[i, p_len - n : p_len] = torch.tensor(p.mm_token_type_ids)
        mask[i, p_len - n : p_len] = 1
        if r:
            ids[i, p_len : p_len + len(r)] = torch.tensor(r)
            mask[i, p_len : p_len + len(r)] = 1
            resp_mask[i, : len(r)] = 1
    pixels = [p.pixel_values_videos for p in prompts if p.has_video]
    grids = [p.video_grid_thw for p in prompts if p.has_video]
    return PackedBatch(
        ids, mask, types, resp_mask, p_len,
        torch.cat(pixels) if pixels else None,
        torch.cat(grids) if grids else None,
    )


def response_logits(model, batch: PackedBatch) -> torch.Tensor:
    """Logits `[B, T, V]` that predict each response token (only the last T+1 positions are projected)."""
    t_len = batch.response_mask.shape[1]
    out = model(**batch.model_inputs(), use_cache=False, logits_to_keep=t_len + 1)
    return out.logits[:, :-1, :]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) gathered at `tokens`: `[B, T, V]`, `[B, T]` -> `[B, T]` float32."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.gather(F.log_softmax(logits, dim=-1), -1, tokens.unsqueeze(-1)).squeeze(-1)


def response_tokens(batch: PackedBatch) -> torch.Tensor:
    """The response token ids `[B, T]` (pad where the mask is 0)."""
    return batch.input_ids[:, batch.prompt_len :]


def pack_prompts(prompts: list[RenderedPrompt], pad_id: int) -> dict:
    """Left-padded prompt-only model inputs for generation (`input_ids`, `attention_mask`, video tensors)."""
    p_len = max(len(p.input_ids) for p in prompts)
    b = len(prompts)
    ids = torch.full((b, p_len), pad_id, dtype=torch.long)
    mask = torch.zeros((b, p_len), dtype=torch.long)
    types = torch.zeros((b, p_len), dtype=torch.long)
    for i, p in enumerate(prompts):
        n = len(p.input_ids)
        ids[i, p_len - n :] = torch.tensor(p.input_ids)
        types[i, p_len - n :] = torch.tensor(p.mm_token_type_ids)
        mask[i, p_len - n :] = 1
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if any(p.has_video for p in prompts):
        kwargs.update(
            mm_token_type_ids=types,
            pixel_values_videos=torch.cat([p.pixel_values_videos for p in prompts if p.has_video]),
            video_grid_thw=torch.cat([p.video_grid_thw for p in prompts if p.has_video]),
        )
    return kwargs
