"""Rollouts with transformers `generate`: the engine that runs anywhere (CPU included)."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from models.batching import pack_prompts
from models.chat import RenderedPrompt
from models.factory import load_model
from rollout.base import Generations, RolloutEngine, SamplingSettings, register_engine


@register_engine("hf")
class HFEngine(RolloutEngine):
    """Owns a copy of the student (loaded from a saved folder) and samples from it in batches."""

    def __init__(self, model_path: str | None = None, batch_size: int = 64, threads: int = 0, device: str = "cpu",
                 model=None, **_: object):
        if threads:
            torch.set_num_threads(threads)
        if (model_path is None) == (model is None):
            raise ValueError("give the HF engine a model_path or a model object, not both")
        self.model = (model if model is not None else load_model(model_path)).to(device).eval()
        self.device = device
        self.batch_size = batch_size
        self.eos_id = self.model.generation_config.eos_token_id or self.model.config.get_text_config().eos_token_id
        if isinstance(self.eos_id, list):
            self.eos_id = self.eos_id[0]
        self.pad_id = self.model.config.get_text_config().pad_token_id

    @torch.no_grad()
    def generate(self, prompts: list[RenderedPrompt], settings: SamplingSettings, targets=None) -> Generations:
        """Batches of similar prompt length (a batch pads to its longest prompt and decodes until its longest
        answer ends, so a mixed-domain batch would carry the long ones' cost for all); results in input order."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].input_ids))
        done = Generations([], [], [])
        for start in range(0, len(order), self.batch_size):
            torch.manual_seed(settings.seed + start)
            done.extend(self._generate_batch([prompts[i] for i in order[start : start + self.batch_size]], settings))
        out = Generations([None] * len(prompts), [None] * len(prompts), [False] * len(prompts))
        for slot, i in enumerate(order):
            out.response_ids[i], out.logprobs[i], out.truncated[i] = (
                done.response_ids[slot], done.logprobs[slot], done.truncated[slot])
        return out

    def _generate_batch(self, prompts: list[RenderedPrompt], settings: SamplingSettings) -> Generations:
        inputs = {k: v.to(self.device) for k, v in pack_prompts(prompts, self.pad_id).items()}
        sample = not settings.greedy and settings.temperature > 0
        suppress = list(settings.suppress_token_ids)
        if sample:
            # Sampling happens in `_Sampler` (the last logits processor), which leaves only the drawn token finite,
            # so generate's greedy pick returns it: transformers' multinomial draw over the full vocabulary costs
            # more than the rest of a decode step of a small model.
            mode = dict(do_sample=False, logits_processor=LogitsProcessorList(
                [_Sampler(settings.temperature, settings.top_p, suppress)]))
        else:
            mode = dict(do_sample=False, suppress_tokens=suppress or None)
        result = self.model.generate(
            **inputs,
            **mode,
            temperature=None,
            top_p=None,
            top_k=None,
            max_new_tokens=settings.max_new_tokens,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
        prompt_len = inputs["input_ids"].shape[1]
        tokens = result.sequences[:, prompt_len:]  # [B, T]
        # log softmax of the raw logits at the drawn token, one decode step ([B, V]) at a time:
        # logit[token] - logsumexp(logits), never a stacked [B, T, V] copy.
        logprobs = torch.stack(
            [step.float().gather(-1, tokens[:, t : t + 1]).squeeze(-1) - torch.logsumexp(step.float(), dim=-1)
             for t, step in enumerate(result.logits)],
            dim=1,
        )
        gens = Generations([], [], [])
        for row, row_lp in zip(tokens.tolist(), logprobs.tolist()):
            if self.eos_id in row:
                n = row.index(self.eos_id) + 1
                gens.response_ids.append(row[:n])
                gens.logprobs.append(row_lp[:n])
                gens.truncated.append(False)
            else:
                gens.response_ids.append(row)
                gens.logprobs.append(row_lp)
                gens.truncated.append(True)
        return gens

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        if unexpected:
            raise KeyError(f"rollout engine got unknown weights: {unexpected[:5]}")


class _Sampler(LogitsProcessor):
    """Draws the next token from softmax(scores / temperature) restricted to the top-p nucleus (transformers'
    TopP rule: drop the low tail whose cumulative probability is <= 1 - top_p, keep at least one token), with
    `suppress` ids removed; returns scores that are -inf except at the drawn token.

    The draw inverts the CDF (one uniform number per row, a float64 cumsum and a binary search): an exact sample
    of the same distribution as `torch.multinomial`, from torch's global generator (seeded per batch by
    `generate`), at a fraction of its cost over a 151k vocabulary. Zero-probability tokens are never drawn.
    """

    def __init__(self, temperature: float, top_p: float, suppress: list[int]):
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.suppress = torch.tensor(suppress, dtype=torch.long) if suppress else None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float()
        if self.temperature != 1.0:
            scores = scores / self.temperature
        suppress = None if self.suppress is None else self.suppress.to(scores.device)
        if self.top_p < 1.0:
            if suppress is not None:  # the nucleus is taken after suppression
                scores = scores.index_fill(-1, suppress, float("-inf"))
            sorted_scores, order = torch.sort(scores, descending=False)
            cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
            drop = cumulative <= (1 - self.top_p)
            drop[..., -1:] = False
            scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if suppress is not None:
            probs.index_fill_(-1, suppress, 0.0)  # the draw below renormalises by the remaining total
        cdf = probs.cumsum(dim=-1, dtype=torch.float64)  # [B, V]
        total = cdf[:, -1:].contiguous()
        u = torch.rand(cdf.shape[0], 1, dtype=torch.float64, device=cdf.device) * total
        drawn = torch.searchsorted(cdf, u, right=True)  # first index whose cdf exceeds u: p > 0 there
        # u can round up to the total: then take the last token with positive probability
        last = torch.searchsorted(cdf, total, right=False)
        drawn = torch.minimum(drawn, last)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, drawn, 0.0)
