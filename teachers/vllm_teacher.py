"""A teacher served by vLLM (`teachers[].backend: vllm`): the teacher's log-probs of the student's sampled tokens.

Same interface and numbers as `HFTeacher`: each sample is rendered in the teacher's view with its own tokenizer
and chat template, the student's response ids are appended, and vLLM's prompt log-probs (log softmax of the raw
logits) over prompt + response are read at the response positions. Top-k comes from the same call
(`prompt_logprobs=k`). Prefix caching is off: a cached prefix has no prompt log-probs.

Video views reach the teacher through the same embedding path as the rollout engine (rollout/vllm_engine.py).

Keywords: those of `HFTeacher` (name, path, view, topk, batch_size, template_kwargs) plus `tensor_parallel_size`,
`gpu_memory_utilization`, `kv_cache_memory_bytes`, `max_model_len`, `dtype`, `threads`, `llm_kwargs` with the
meanings of rollout/vllm_engine.py (typed in `teachers.options.VLLMTeacherOptions`).
"""

from __future__ import annotations

from typing import Any

import torch

from models.chat import ChatRenderer
from models.factory import load_tokenizer
from models.vision import VisionLayout
from rollout.vllm_engine import VLLMEngine
from tasks.base import Sample
from teachers.base import TeacherScores
from teachers.views import view_messages


class VLLMTeacher:
    def __init__(
        self,
        name: str,
        path: str,
        view: str = "native",
        topk: int = 0,
        batch_size: int = 64,
        template_kwargs: dict[str, Any] | None = None,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float | None = None,
        kv_cache_memory_bytes: int | None = None,
        max_model_len: int | None = None,
        dtype: str | None = None,
        threads: int = 0,
        llm_kwargs: dict[str, Any] | None = None,
    ):
        from transformers import AutoConfig

        self.name = name
        self.view = view
        self.topk = topk
        self.batch_size = batch_size
        extra = dict(llm_kwargs or {})
        extra.setdefault("enable_prefix_caching", False)
        if topk:
            extra.setdefault("max_logprobs", max(20, topk))
        # The rollout engine owns the vLLM set-up (folders, video embeddings); a teacher never syncs weights.
        self.engine = VLLMEngine(
            model_path=path, batch_size=batch_size, tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization, kv_cache_memory_bytes=kv_cache_memory_bytes,
            max_model_len=max_model_len, dtype=dtype, threads=threads, llm_kwargs=extra,
        )
        self.tokenizer = load_tokenizer(path)
        vision = getattr(AutoConfig.from_pretrained(path), "vision_config", None)
        layout = None if vision is None else VisionLayout.from_config(vision)
        self.renderer = ChatRenderer(self.tokenizer, layout, template_kwargs)

    def vocab_signature(self) -> int:
        """A hash of the vocabulary: teachers must share the student's token ids."""
        return hash(tuple(sorted(self.tokenizer.get_vocab().items())))

    @torch.no_grad()
    def score(self, samples: list[Sample], responses: list[list[int]], shard_index: int = 0) -> TeacherScores:
        from vllm import SamplingParams

        if len(samples) != len(responses):
            raise ValueError(f"{len(samples)} samples but {len(responses)} responses")
        t_len = max(1, max(len(r) for r in responses))
        logprobs = torch.zeros(len(samples), t_len)
        topk_ids = torch.zeros(len(samples), t_len, self.topk, dtype=torch.long) if self.topk else None
        topk_lp = torch.zeros(len(samples), t_len, self.topk) if self.topk else None
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=self.topk, detokenize=False)
        for start in range(0, len(samples), self.batch_size):
            chunk = range(start, min(start + self.batch_size, len(samples)))
            prompts = [self.renderer.render(view_messages(samples[i], self.view), samples[i].tools) for i in chunk]
            full = [type(p)(list(p.input_ids) + list(responses[i]), list(p.mm_token_type_ids) + [0] * len(responses[i]),
                            p.pixel_values_videos, p.video_grid_thw) for p, i in zip(prompts, chunk)]
            results = self.engine.llm.generate(self.engine._requests(full), params, use_tqdm=False)
            self.engine.check_expansion(full, results)
            for row, p, result in zip(chunk, prompts, results):
                response = responses[row]
                entries = result.prompt_logprobs[len(p.input_ids) : len(p.input_ids) + len(response)]
                for t, (token, entry) in enumerate(zip(response, entries)):
                    logprobs[row, t] = entry[token].logprob
                    if self.topk:
                        # k best by rank (the scored token is returned too; when outside the top-k its rank is > k).
                        ranked = sorted(entry.items(), key=lambda kv: kv[1].rank)[: self.topk]
                        topk_ids[row, t] = torch.tensor([k for k, _ in ranked])
                        topk_lp[row, t] = torch.tensor([v.logprob for _, v in ranked])
        return TeacherScores(logprobs, topk_ids, topk_lp)
