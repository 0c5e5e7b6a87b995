"""Rollouts with transformers `generate`: the engine that runs anywhere (CPU included)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
        out = Generations([], [], [])
        generator_seed = settings.seed
        for start in range(0, len(prompts), self.batch_size):
            torch.manual_seed(generator_seed + start)
            out.extend(self._generate_batch(prompts[start : start + self.batch_size], settings))
        return out

    def _generate_batch(self, prompts: list[RenderedPrompt], settings: SamplingSettings) -> Generations:
        inputs = {k: v.to(self.device) for k, v in pack_prompts(prompts, self.pad_id).items()}
        sample = not settings.greedy and settings.temperature > 0
        result = self.model.generate(
            **inputs,
            max_new_tokens=settings.max_new_tokens,
            do_sample=sample,
            temperature=settings.temperature if sample else None,
            top_p=settings.top_p if sample else None,
            top_k=0 if sample else None,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
            suppress_tokens=list(settings.suppress_token_ids) or None,
            output_logits=True,
            return_dict_in_generate=True,
        )
        prompt_len = inputs["input_ids"].shape[1]
        tokens = result.sequences[:, prompt_len:]  # [B, T]
        logits = torch.stack(result.logits, dim=1).float()  # [B, T, V] raw logits
        logprobs = torch.gather(F.log_softmax(logits, -1), -1, tokens.unsqueeze(-1)).squeeze(-1)
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
