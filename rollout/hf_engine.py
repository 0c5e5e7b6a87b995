"""Rollouts with transformers `generate`: the engine that runs anywhere (CPU included)."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from models.batching import pack_prompts
from models.chat import RenderedPrompt
from models.factory import inference_dtype, load_model
from rollout.base import Generations, RolloutEngine, SamplingSettings, register_engine
from rollout.options import HFEngineOptions


@register_engine("hf", options=HFEngineOptions)
class HFEngine(RolloutEngine):
    """Owns a copy of the student (loaded from a saved folder) and samples from it in batches."""

    def __init__(self, model_path: str | None = None, batch_size: int = 64, threads: int = 0, device: str = "cpu",
                 model=None, dtype: str = "float32"):
        """`dtype`: the precision of the engine's own copy of the weights (`rollout.engine_args.dtype`, e.g.
        "bfloat16"); synced float32 weights are cast into it."""
        if threads:
            torch.set_num_threads(threads)
        if (model_path is None) == (model is None):
            raise ValueError("give the HF engine a model_path or a model object, not both")
        weights = inference_dtype(dtype, "rollout.engine_args.dtype")
        self.model = (model if model is not None else load_model(model_path, dtype=weights)).to(device).eval()
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
        sampler = None
        if sample:
            # Sampling happens in `_Sampler` (the last logits processor), which leaves only the drawn token finite,
            # so generate's greedy pick returns it, and records the drawn token's log-prob as it goes:
            # transformers' multinomial draw over the full vocabulary costs more than the rest of a decode step
            # of a small model, and keeping every step's `[B, V]` logits to score them afterwards costs memory.
            # A model's own `min_new_tokens` (end-of-turn barred for the first N tokens) is applied there too:
            # transformers' processor for it rebuilds a vocabulary-sized mask every decode step.
            min_new = self.model.generation_config.min_new_tokens or 0
            sampler = _Sampler(settings.temperature, settings.top_p, suppress, self.eos_id, min_new)
            mode = dict(do_sample=False, logits_processor=LogitsProcessorList([sampler]), min_new_tokens=0)
        else:
            mode = dict(do_sample=False, suppress_tokens=suppress or None, output_logits=True)
        result = self.model.generate(
            **inputs,
            **mode,
            temperature=None,
            top_p=None,
            top_k=None,
            max_new_tokens=settings.max_new_tokens,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
            return_dict_in_generate=True,
        )
        prompt_len = inputs["input_ids"].shape[1]
        tokens = result.sequences[:, prompt_len:]  # [B, T]
        if sampler is not None:  # generate may run (and then undo) extra steps: keep the first T
            logprobs = torch.stack(sampler.logprobs[: tokens.shape[1]], dim=1)
        else:
            # log softmax of the raw logits at the chosen token, one decode step ([B, V]) at a time
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

    def load_weights(self, state_dict: dict[str, torch.Tensor], last: bool = True) -> None:
        """Copy (some of) the trainer's weights in; `last` (the final bucket of a sync) changes nothing here."""
        missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        if unexpected:
            raise KeyError(f"rollout engine got unknown weights: {unexpected[:5]}")


# Tokens per block of the two-level inverse-CDF draw (block totals, then one block's cumulative sum).
_DRAW_BLOCK = 512


def draw_from_probs(probs: torch.Tensor) -> torch.Tensor:
    """One token per row of `probs [B, V]` (non-negative, rows need not sum to 1), drawn with probability
    proportional to its entry: `[B, 1]` ids, from torch's global generator.

    Inverse CDF in two levels: a float64 cumulative sum over the block totals picks the block, a float64
    cumulative sum inside that block picks the token. Exact like `torch.multinomial`, but one float64 cumsum
    over the whole 151k vocabulary alone costs ~10 ms a decode step on one core; this costs well under 1 ms.
    Zero-probability tokens are never drawn (the first index whose cumulative sum exceeds u has p > 0).
    """
    b, v = probs.shape
    full = v // _DRAW_BLOCK * _DRAW_BLOCK
    sums = probs[:, :full].reshape(b, -1, _DRAW_BLOCK).sum(-1)
    if full < v:
        sums = torch.cat([sums, probs[:, full:].sum(-1, keepdim=True)], dim=-1)
    cdf = sums.double().cumsum(-1)  # [B, blocks]
    total = cdf[:, -1:].contiguous()
    u = torch.rand(b, 1, dtype=torch.float64, device=probs.device) * total
    # u can round up to the total: then the last block (and token) with positive mass
    block = torch.minimum(torch.searchsorted(cdf, u, right=True), torch.searchsorted(cdf, total, right=False))
    before = torch.where(block > 0, cdf.gather(-1, (block - 1).clamp(min=0)), torch.zeros_like(u))
    cols = block * _DRAW_BLOCK + torch.arange(_DRAW_BLOCK, device=probs.device)  # [B, BLOCK]
    inside = probs.gather(-1, cols.clamp(max=v - 1)).masked_fill(cols >= v, 0.0).double().cumsum(-1)
    last = torch.searchsorted(inside, inside[:, -1:].contiguous(), right=False)
    pick = torch.minimum(torch.searchsorted(inside, u - before, right=True), last)
    return block * _DRAW_BLOCK + pick


class _Sampler(LogitsProcessor):
    """Draws the next token from softmax(scores / temperature) restricted to the top-p nucleus (transformers'
    TopP rule: drop the low tail whose cumulative probability is <= 1 - top_p, keep at least one token), with
    `suppress` ids removed (and `eos_id` for the first `min_new_tokens` steps); returns scores that are -inf
    except at the drawn token, and appends the drawn token's log-prob under the raw logits
    (`log softmax(scores)`, what the trainer's pi_old is compared to) to `self.logprobs` (`[B]` per step).

    The draw is `draw_from_probs`: an exact sample of the same distribution as `torch.multinomial`, from torch's
    global generator (seeded per batch by `generate`), at a fraction of its cost over a 151k vocabulary. Per decode
    step it allocates nothing vocabulary-sized (plain sampling works in place on the float32 copy of the step's
    logits that `generate` hands its processors, and the returned -inf row is reused): at 151k tokens fresh
    5 MB buffers cost as much as the arithmetic.
    """

    def __init__(self, temperature: float, top_p: float, suppress: list[int], eos_id: int | None = None,
                 min_new_tokens: int = 0):
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.suppress = torch.tensor(suppress, dtype=torch.long) if suppress else None
        self.eos_with_suppress = (
            torch.tensor(sorted({*suppress, eos_id}), dtype=torch.long) if eos_id is not None else None)
        self.min_new_tokens = int(min_new_tokens) if eos_id is not None else 0
        self.logprobs: list[torch.Tensor] = []
        self._out: torch.Tensor | None = None
        self._drawn: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        blocked = self.eos_with_suppress if len(self.logprobs) < self.min_new_tokens else self.suppress
        blocked = None if blocked is None else blocked.to(scores.device)
        plain = self.temperature == 1.0 and self.top_p >= 1.0
        raw = scores.float()
        if plain:  # softmax in place: the log-prob is read off the probabilities below
            probs = raw.sub_(raw.amax(dim=-1, keepdim=True)).exp_()
            probs.div_(probs.sum(dim=-1, keepdim=True))
        else:
            scores = raw / self.temperature if self.temperature != 1.0 else raw.clone()
            if self.top_p < 1.0:
                if blocked is not None:  # the nucleus is taken after suppression
                    scores.index_fill_(-1, blocked, float("-inf"))
                sorted_scores, order = torch.sort(scores, descending=False)
                cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
                drop = cumulative <= (1 - self.top_p)
                drop[..., -1:] = False
                scores.masked_fill_(drop.scatter(-1, order, drop), float("-inf"))
            probs = torch.softmax(scores, dim=-1)
        if blocked is not None:
            probs.index_fill_(-1, blocked, 0.0)  # the draw renormalises by the remaining total
        drawn = draw_from_probs(probs)
        if plain:  # a drawn token is never blocked, so its entry is still the raw softmax probability
            self.logprobs.append(probs.gather(-1, drawn).squeeze(-1).log())
        else:
            self.logprobs.append(raw.gather(-1, drawn).squeeze(-1) - torch.logsumexp(raw, dim=-1))
        if self._out is None or self._out.shape != probs.shape:
            self._out = torch.full_like(probs, float("-inf"))
        else:
            self._out.scatter_(-1, self._drawn, float("-inf"))
        self._drawn = drawn
        return self._out.scatter_(-1, drawn, 0.0)
