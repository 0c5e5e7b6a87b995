"""Pack prompts and responses into one padded batch and read response-token log-probs from a model.

Layout (verl's): prompts left-padded to P, responses right-padded to T, so response token t of every row sits
in column P + t. Logits at column P + t - 1 predict it, which lets every scorer (trainer, teacher, sampler check)
slice `[B, T]` log-probs the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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

    def to(self, device: torch.device | str) -> PackedBatch:
        """The same batch with every tensor on `device` (the training rank's)."""
        move = lambda t: t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t  # noqa: E731
        return PackedBatch(**{f: move(getattr(self, f)) for f in self.__dataclass_fields__})

    def model_inputs(self, model=None) -> dict:
        """Keyword arguments of the model's forward (`model` unused: the same call as `SharedPromptBatch`'s)."""
        kwargs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.video_grid_thw is not None:
            kwargs.update(
                mm_token_type_ids=self.mm_token_type_ids,
                pixel_values_videos=self.pixel_values_videos,
                video_grid_thw=self.video_grid_thw,
            )
        return kwargs

    def predicting_states(self, hidden: torch.Tensor) -> torch.Tensor:
        """`hidden [B, P+T, H]` -> `[B, T, H]`: position P + t - 1 predicts response token t."""
        t_len = self.response_mask.shape[1]
        return hidden[:, self.prompt_len - 1 : self.prompt_len + t_len - 1]


def pack(
    prompts: list[RenderedPrompt], responses: list[list[int]], pad_id: int, response_len: int | None = None
) -> PackedBatch:
    """Left-pad prompts, right-pad responses (which may be empty lists) to `response_len` (default: the longest),
    concatenate. A fixed `response_len` keeps a sub-batch's response columns aligned with `[B, T]` tensors."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    p_len = max(len(p.input_ids) for p in prompts)
    t_len = max(1, max(len(r) for r in responses), response_len or 0)
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
    """Logits `[B, T, V]` that predict each response token: only positions P-1 .. P+T-2 are projected, so the
    result is contiguous (no copy of a sliced vocabulary-wide tensor) and holds no unused last position."""
    t_len = batch.response_mask.shape[1]
    p_len = batch.prompt_len
    keep = torch.arange(p_len - 1, p_len + t_len - 1, device=batch.input_ids.device)
    return model(**batch.model_inputs(), use_cache=False, logits_to_keep=keep).logits


# Rows of vocabulary-wide work per chunk: 16 x 151k float32 is ~10 MB, a scratch buffer malloc can reuse
# instead of page-faulting a fresh [B, T, V] tensor for every intermediate.
_CHUNK_ROWS = 16


def logsumexp(logits: torch.Tensor, temperature: float = 1.0, with_entropy: bool = False):
    """logsumexp(logits / temperature) over the vocabulary: `[..., V]` -> `[...]` float32, no gradient.
    `with_entropy`: also the entropy of softmax(logits / temperature) at each position, from the same pass over
    the vocabulary (a second pass would re-read the whole `[..., V]` tensor for a logging metric).

    Chunked over rows with reused buffers; equals `torch.logsumexp` to float tolerance.
    """
    with torch.no_grad():
        flat = logits.detach().reshape(-1, logits.shape[-1])
        out = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
        entropy = torch.empty_like(out) if with_entropy else None
        n = min(_CHUNK_ROWS, flat.shape[0])
        buf = torch.empty(n, flat.shape[1], dtype=torch.float32, device=flat.device)
        exps = torch.empty_like(buf) if with_entropy else None
        for start in range(0, flat.shape[0], _CHUNK_ROWS):
            rows = flat[start : start + _CHUNK_ROWS]
            b = buf[: rows.shape[0]]
            if temperature != 1.0 or rows.dtype != torch.float32:
                rows = torch.div(rows, temperature, out=b)
            top = rows.amax(dim=-1, keepdim=True)
            top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
            shifted = torch.sub(rows, top, out=b)  # z - max
            if entropy is None:
                total = shifted.exp_().sum(-1)
            else:  # H = log(total) - E_p[z - max]
                e = torch.exp(shifted, out=exps[: rows.shape[0]])
                total = e.sum(-1)
                entropy[start : start + rows.shape[0]] = total.log() - e.mul_(shifted).nan_to_num_(0.0).sum(-1) / total
            out[start : start + rows.shape[0]] = total.log_().add_(top.squeeze(-1))
        shape = logits.shape[:-1]
        return (out.view(shape), entropy.view(shape)) if with_entropy else out.view(shape)


class _TokenLogprob(torch.autograd.Function):
    """log softmax(logits / T) at k tokens per position (`tokens [..., k]`) without materialising the
    log-softmax; the backward writes (onehot - softmax) / T * grad, summed over the k tokens, straight into one
    `[N, V]` gradient. Second output: the entropy per position (no gradient), from the forward's pass."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, tokens: torch.Tensor, temperature: float, with_entropy: bool):
        if with_entropy:
            lse, entropy = logsumexp(logits, temperature, with_entropy=True)
        else:
            lse = logsumexp(logits, temperature)
            entropy = lse.new_empty(0)
        picked = torch.gather(logits, -1, tokens).float()
        if temperature != 1.0:
            picked = picked / temperature
        ctx.save_for_backward(logits, tokens, lse)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(entropy)
        return picked - lse.unsqueeze(-1), entropy

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _grad_entropy: torch.Tensor | None = None):
        logits, tokens, lse = ctx.saved_tensors
        temperature = ctx.temperature
        flat = logits.reshape(-1, logits.shape[-1])
        k = tokens.shape[-1]
        g_tokens = grad.reshape(-1, k).float()
        g = g_tokens.sum(-1, keepdim=True)
        lse_flat = lse.reshape(-1, 1)
        out = torch.empty_like(flat)
        buf = None if temperature == 1.0 and out.dtype == torch.float32 else torch.empty(
            min(_CHUNK_ROWS, flat.shape[0]), flat.shape[1], dtype=torch.float32, device=flat.device)
        for start in range(0, flat.shape[0], _CHUNK_ROWS):
            stop = start + _CHUNK_ROWS
            rows = flat[start:stop]
            if temperature == 1.0 and out.dtype == torch.float32:
                torch.sub(rows, lse_flat[start:stop], out=out[start:stop]).exp_().mul_(-g[start:stop])
                continue
            b = buf[: rows.shape[0]]
            torch.div(rows, temperature, out=b)
            b.sub_(lse_flat[start:stop]).exp_().mul_(-g[start:stop])  # -softmax * grad
            out[start:stop] = b
        out.scatter_add_(-1, tokens.reshape(-1, k), g_tokens.to(out.dtype))
        if temperature != 1.0:
            out.div_(temperature)
        return out.view(logits.shape), None, None, None


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                   return_entropy: bool = False):
    """log softmax(logits / temperature) gathered at `tokens`: `[B, T, V]`, `[B, T]` -> `[B, T]` float32, or
    `[B, T, k]` -> `[B, T, k]` for k tokens per position (a teacher's top-k support).

    Computed as logit[token] / T - logsumexp(logits / T) in row chunks (differentiable w.r.t. `logits`), so no
    full-vocabulary log-softmax is allocated forward or backward. `return_entropy`: also the entropy `[B, T]`
    (no gradient) from the same pass over the vocabulary.
    """
    tokens = tokens.long()
    several = tokens.dim() == logits.dim()
    index = tokens if several else tokens.unsqueeze(-1)
    if logits.requires_grad and torch.is_grad_enabled():
        out, entropy = _TokenLogprob.apply(logits, index, float(temperature), return_entropy)
    else:
        picked = torch.gather(logits, -1, index).float()
        if temperature != 1.0:
            picked = picked / temperature
        lse, entropy = logsumexp(logits, temperature, with_entropy=True) if return_entropy else (
            logsumexp(logits, temperature), None)
        out = picked - lse.unsqueeze(-1)
    out = out if several else out.squeeze(-1)
    return (out, entropy) if return_entropy else out


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
