"""A teacher served by transformers: one forward pass over (its view of the prompt) + (the student's responses).

With shared-prompt packing (the default) a sample's G responses are scored over one copy of its prompt
(`models.packing`); otherwise every response carries its own left-padded prompt copy (`models.batching.pack`).
"""

from __future__ import annotations

from typing import Any

import torch

from models.batching import logsumexp, pack, response_logits, response_tokens
from models.dsa import is_dsa_model
from models.packing import (budget_batches, pack_shared, packed_response_logits, packed_tokens, resolve_attention,
                            set_attention, shared_prompt_groups)
from models.chat import ChatRenderer, RenderedPrompt
from models.factory import inference_dtype, load_model, load_tokenizer, vision_layout
from tasks.base import Sample
from teachers.base import TeacherScores
from teachers.views import view_messages


class HFTeacher:
    """Scores responses (token ids in the shared vocabulary) under the teacher model.

    The teacher renders each sample with its own tokenizer, chat template and vision layout after applying its
    view, so a text-only teacher of another family scores the same response tokens as the student sampled.
    """

    def __init__(
        self,
        name: str,
        path: str,
        view: str = "native",
        topk: int = 0,
        batch_size: int = 64,
        template_kwargs: dict[str, Any] | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        packing: str = "shared_prompt",
        batch_tokens: int = 16384,
        attention: str = "auto",
    ):
        """`dtype`: the precision the teacher is served in (`teachers[].engine_args.dtype`, e.g. "bfloat16");
        `packing`, `batch_tokens`, `attention`: `teachers[].engine_args` too (`teachers.options.HFTeacherOptions`)."""
        self.name = name
        self.view = view
        self.topk = topk
        self.batch_size = batch_size
        self.device = device
        self.packing = packing
        self.batch_tokens = batch_tokens
        weights = inference_dtype(dtype, f"teachers[{name}].engine_args.dtype")
        self.model = load_model(path, dtype=weights).to(device).eval()
        set_attention(self.model, resolve_attention(attention, device, packing == "shared_prompt",
                                                    dsa=is_dsa_model(self.model)))
        self.tokenizer = load_tokenizer(path)
        self.renderer = ChatRenderer(self.tokenizer, vision_layout(self.model), template_kwargs)

    def vocab_signature(self) -> int:
        """A hash of the vocabulary: teachers must share the student's token ids."""
        return hash(tuple(sorted(self.tokenizer.get_vocab().items())))

    @torch.no_grad()
    def score(self, samples: list[Sample], responses: list[list[int]], shard_index: int = 0) -> TeacherScores:
        """Log-probs `[B, T]` of each response's tokens (and the teacher's top-k ids / log-probs `[B, T, k]`)."""
        rendered: dict[int, RenderedPrompt] = {}  # one rendering per sample object (a video is laid out once)
        for s in samples:
            if id(s) not in rendered:
                rendered[id(s)] = self.renderer.render(view_messages(s, self.view), s.tools)
        prompts = [rendered[id(s)] for s in samples]
        if self.packing == "shared_prompt":
            return score_packed(self.model, prompts, [s.id for s in samples], responses, self.topk,
                                self.batch_tokens, self.batch_size, self.device)
        return score_padded(self.model, prompts, responses, self.tokenizer.pad_token_id, self.topk,
                            self.batch_size, self.device)


def _empty_scores(b: int, t_len: int, topk: int) -> TeacherScores:
    return TeacherScores(torch.zeros(b, t_len), torch.zeros(b, t_len, topk, dtype=torch.long) if topk else None,
                         torch.zeros(b, t_len, topk) if topk else None)


@torch.no_grad()
def score_padded(model, prompts: list[RenderedPrompt], responses: list[list[int]], pad_id: int, topk: int,
                 batch_size: int, device: str = "cpu") -> TeacherScores:
    """Every response with its own left-padded prompt copy, `batch_size` rows per forward (CPU results)."""
    t_len = max(1, max(len(r) for r in responses))
    out = _empty_scores(len(prompts), t_len, topk)
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        batch = pack(prompts[chunk], responses[chunk], pad_id).to(device)
        logits = response_logits(model, batch)  # [b, t, V]
        lse = logsumexp(logits)  # [b, t]: log-probs are logit - lse, no [b, t, V] log-softmax
        tokens = response_tokens(batch)
        picked = torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1).float()
        lp = (picked - lse) * batch.response_mask
        n = lp.shape[1]
        out.logprobs[chunk, :n] = lp.cpu()
        if topk:
            values, ids = logits.topk(topk, dim=-1)
            out.topk_ids[chunk, :n] = ids.cpu()
            out.topk_logprobs[chunk, :n] = (values.float() - lse.unsqueeze(-1)).cpu()
    return out


@torch.no_grad()
def score_packed(model, prompts: list[RenderedPrompt], keys: list, responses: list[list[int]], topk: int,
                 batch_tokens: int, batch_size: int, device: str = "cpu") -> TeacherScores:
    """Rows with the same key and an identical prompt share one prompt copy (`models.packing`); whole groups
    per forward, up to `batch_tokens` packed tokens and `batch_size` rows; only response positions are projected."""
    t_len = max(1, max(len(r) for r in responses))
    out = _empty_scores(len(prompts), t_len, topk)
    units = shared_prompt_groups(prompts, keys)
    tokens = [packed_tokens(len(prompts[u[0]].input_ids), [len(responses[i]) for i in u]) for u in units]
    for rows in budget_batches(units, tokens, batch_tokens, batch_size):
        batch = pack_shared([prompts[i] for i in rows], [responses[i] for i in rows], [keys[i] for i in rows],
                            response_len=t_len).to(device)
        real = batch.response_mask > 0  # [b, T]
        logits = packed_response_logits(model, batch)  # [N, V], N real response tokens
        lse = logsumexp(logits)  # [N]
        picked = torch.gather(logits, -1, batch.response_tokens()[real].unsqueeze(-1)).squeeze(-1).float()
        lp = torch.zeros(len(rows), t_len, device=logits.device)
        lp[real] = picked - lse
        out.logprobs[rows] = lp.cpu()
        if topk:
            values, ids = logits.topk(topk, dim=-1)
            top_ids = torch.zeros(len(rows), t_len, topk, dtype=torch.long, device=logits.device)
            top_lp = torch.zeros(len(rows), t_len, topk, device=logits.device)
            top_ids[real], top_lp[real] = ids, values.float() - lse.unsqueeze(-1)
            out.topk_ids[rows], out.topk_logprobs[rows] = top_ids.cpu(), top_lp.cpu()
    return out
