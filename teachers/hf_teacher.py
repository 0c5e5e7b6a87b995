"""A teacher served by transformers: one forward pass over (its view of the prompt) + (the student's response)."""

from __future__ import annotations

from typing import Any

import torch

from models.batching import logsumexp, pack, response_logits, response_tokens
from models.chat import ChatRenderer
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
    ):
        """`dtype`: the precision the teacher is served in (`teachers[].engine_args.dtype`, e.g. "bfloat16")."""
        self.name = name
        self.view = view
        self.topk = topk
        self.batch_size = batch_size
        self.device = device
        weights = inference_dtype(dtype, f"teachers[{name}].engine_args.dtype")
        self.model = load_model(path, dtype=weights).to(device).eval()
        self.tokenizer = load_tokenizer(path)
        self.renderer = ChatRenderer(self.tokenizer, vision_layout(self.model), template_kwargs)

    def vocab_signature(self) -> int:
        """A hash of the vocabulary: teachers must share the student's token ids."""
        return hash(tuple(sorted(self.tokenizer.get_vocab().items())))

    @torch.no_grad()
    def score(self, samples: list[Sample], responses: list[list[int]], shard_index: int = 0) -> TeacherScores:
        t_len = max(1, max(len(r) for r in responses))
        logprobs = torch.zeros(len(samples), t_len)
        topk_ids = torch.zeros(len(samples), t_len, self.topk, dtype=torch.long) if self.topk else None
        topk_lp = torch.zeros(len(samples), t_len, self.topk) if self.topk else None
        for start in range(0, len(samples), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            prompts = [self.renderer.render(view_messages(s, self.view), s.tools) for s in samples[chunk]]
            batch = pack(prompts, responses[chunk], self.tokenizer.pad_token_id)
            inputs = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in vars(batch).items()}
            batch = type(batch)(**inputs)
            logits = response_logits(self.model, batch)  # [b, t, V]
            lse = logsumexp(logits)  # [b, t]: log-probs are logit - lse, no [b, t, V] log-softmax
            tokens = response_tokens(batch)
            picked = torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1).float()
            lp = (picked - lse) * batch.response_mask
            n = lp.shape[1]
            logprobs[chunk, :n] = lp.cpu()
            if self.topk:
                values, ids = logits.topk(self.topk, dim=-1)
                topk_ids[chunk, :n] = ids.cpu()
                topk_lp[chunk, :n] = (values.float() - lse.unsqueeze(-1)).cpu()
        return TeacherScores(logprobs, topk_ids, topk_lp)
