"""Rollouts with vLLM (`rollout.backend: vllm`), hosted like every engine by a Ray actor (rollout/actors.py).

Same contract as the transformers engine (rollout/hf_engine.py): per prompt, the response ids end with the
end-of-turn token unless truncated by `max_new_tokens`; the log-probs are log softmax of the RAW logits
(temperature 1, before top-p and token suppression: vLLM's default `logprobs_mode="raw_logprobs"`) of the sampled
tokens; `suppress_token_ids` are never sampled; request i samples with seed `settings.seed + i`.

Video prompts go through vLLM's multimodal embedding input: the engine runs vLLM's own vision tower of the
served model on the prompt's patchified frames (so synced vision weights are used too) and hands the embeddings,
one item per temporal group with its `video_grid_thw` row and timestamp, to the generate call. vLLM expands each
item's `<|video_pad|>` into `<t seconds><|vision_start|><|video_pad|> x n<|vision_end|>` itself, so the engine
sends each such run of the rendered prompt collapsed to one `<|video_pad|>`; the expansion gives back the
rendered ids exactly (checked on every request).

Constructor keywords (the trainer passes `model_path` and `batch_size`; the rest are `rollout.engine_args`, typed
in `rollout.options.VLLMEngineOptions`):
    tensor_parallel_size: int = 1          GPUs per engine (Ray gives the actor that many: gpus_per_worker)
    gpu_memory_utilization: float | None   share of GPU memory for weights + KV cache (on CPU: of RAM; 0.5 default)
    kv_cache_memory_bytes: int | None      KV cache size, overrides the utilisation (CPU default 512 MiB)
    max_model_len: int | None              context limit (default: the model config's)
    dtype: str | None                      "float32" on CPU by default (the trainer's), else vLLM's "auto"
    sync: str | None                       weight-sync method (rollout/weight_sync.py): iterator | folder | ipc
                                           (default: iterator on CPU, ipc on GPU)
    sync_options: dict | None              keyword arguments of the sync method (e.g. {"folder": "/dev/shm/x"})
    check_sync: bool = False               after each sync compare vLLM's log-probs of a probe sequence with
                                           transformers' on the received weights; raise above check_tolerance
    check_tolerance: float = 1e-3          max abs log-prob difference the check accepts
    sleep_level: int = 0                   1 or 2: sleep between generate calls (weights offloaded / dropped) so
                                           the trainer can use the GPU memory; needs vLLM's sleep mode (CUDA)
    stop: list[str] | None                 stop strings (the response then ends at them, not at end-of-turn)
    threads: int = 0                       torch CPU threads (0: leave as is)
    llm_kwargs: dict | None                any other `vllm.LLM` keyword argument, passed through
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import torch

from models.chat import RenderedPrompt
from rollout.base import Generations, RolloutEngine, SamplingSettings, register_engine
from rollout.options import VLLMEngineOptions
from rollout.vllm_compat import build_llm, import_vllm, model_type
from rollout.weight_sync import default_sync, make_sync

# Fails here, with the install hint, where vLLM is missing: `get_engine_class("vllm")` reports it as such.
import_vllm()

log = logging.getLogger(__name__)
_STAMP = re.compile(r"<\s*(\d+(?:\.\d+)?)\s*seconds>\s*$")


@register_engine("vllm", options=VLLMEngineOptions)
class VLLMEngine(RolloutEngine):
    def __init__(
        self,
        model_path: str,
        batch_size: int = 64,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float | None = None,
        kv_cache_memory_bytes: int | None = None,
        max_model_len: int | None = None,
        dtype: str | None = None,
        sync: str | None = None,
        sync_options: dict[str, Any] | None = None,
        check_sync: bool = False,
        check_tolerance: float = 1e-3,
        sleep_level: int = 0,
        stop: list[str] | None = None,
        threads: int = 0,
        llm_kwargs: dict[str, Any] | None = None,
    ):
        from transformers import AutoConfig, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        if sleep_level not in (0, 1, 2):
            raise ValueError(f"rollout.engine_args.sleep_level must be 0, 1 or 2, got {sleep_level}")
        from vllm.platforms import current_platform

        if sleep_level and not current_platform.is_sleep_mode_available():
            raise ValueError(f"rollout.engine_args.sleep_level={sleep_level}: this vLLM build has no sleep mode on "
                             f"{current_platform.device_type}; set it to 0")
        self.model_path = model_path
        self.batch_size = batch_size
        self.sync = make_sync(sync or default_sync(), **(sync_options or {}))
        self.check_sync = check_sync
        self.check_tolerance = check_tolerance
        self.sleep_level = sleep_level
        self.stop = list(stop or [])
        kwargs = dict(llm_kwargs or {})
        kwargs.update(self.sync.llm_kwargs())
        kwargs.update(tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
                      kv_cache_memory_bytes=kv_cache_memory_bytes, max_model_len=max_model_len, dtype=dtype)
        if sleep_level:
            kwargs["enable_sleep_mode"] = True
        self.llm = build_llm(model_path, **kwargs)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        config = AutoConfig.from_pretrained(model_path)
        text = config.get_text_config()
        self.eos_id = text.eos_token_id[0] if isinstance(text.eos_token_id, list) else text.eos_token_id
        self.vocab_size = text.vocab_size
        self.is_vl = model_type(model_path).startswith("qwen3_vl")
        self.vision_start = getattr(config, "vision_start_token_id", None)
        self.vision_end = getattr(config, "vision_end_token_id", None)
        self.video_pad = getattr(config, "video_token_id", None)
        self.syncs: list[dict[str, float]] = []  # one entry per load_weights: seconds (+ check result)
        self._asleep = False
        if sleep_level:
            self._sleep()

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: list[RenderedPrompt], settings: SamplingSettings, targets=None) -> Generations:
        self._wake()
        try:
            out = Generations([], [], [])
            for start in range(0, len(prompts), self.batch_size):
                out.extend(self._generate_batch(prompts[start : start + self.batch_size], settings, start))
            return out
        finally:
            self._sleep()

    def _generate_batch(self, prompts: list[RenderedPrompt], settings: SamplingSettings, offset: int) -> Generations:
        from vllm import SamplingParams

        greedy = settings.greedy or settings.temperature <= 0
        allowed = self._allowed_tokens(settings.suppress_token_ids)
        params = [
            SamplingParams(
                n=1,
                temperature=0.0 if greedy else settings.temperature,
                top_p=1.0 if greedy else settings.top_p,
                top_k=0,
                max_tokens=settings.max_new_tokens,
                seed=settings.seed + offset + i,
                logprobs=0,  # the sampled token's own log-prob (raw logits, see module doc)
                stop_token_ids=[self.eos_id],
                stop=self.stop or None,
                include_stop_str_in_output=True,
                detokenize=bool(self.stop),
                allowed_token_ids=allowed,
            )
            for i in range(len(prompts))
        ]
        requests = self._requests(prompts)
        results = self.llm.generate(requests, params, use_tqdm=False)
        self.check_expansion(prompts, results)
        gens = Generations([], [], [])
        for result in results:
            completion = result.outputs[0]
            ids = list(completion.token_ids)
            logprobs = [entry[token].logprob for token, entry in zip(ids, completion.logprobs)]
            gens.response_ids.append(ids)
            gens.logprobs.append(logprobs)
            gens.truncated.append(completion.finish_reason == "length" and (not ids or ids[-1] != self.eos_id))
        return gens

    def _allowed_tokens(self, suppressed: tuple[int, ...]) -> list[int] | None:
        if not suppressed:
            return None
        key = tuple(sorted(suppressed))
        if getattr(self, "_allowed_key", None) != key:
            banned = set(key)
            self._allowed_key = key
            self._allowed = [t for t in range(self.vocab_size) if t not in banned]
        return self._allowed

    def _requests(self, prompts: list[RenderedPrompt]) -> list[dict[str, Any]]:
        """vLLM token prompts; video prompts carry their embeddings (one item per temporal group)."""
        video = [p for p in prompts if p.has_video]
        embeds = iter(self._video_embeddings(video)) if video else None
        requests = []
        for p in prompts:
            request: dict[str, Any] = {"prompt_token_ids": list(p.input_ids)}
            if p.has_video:
                if not self.is_vl:
                    raise ValueError(f"{self.model_path} has no vision tower but a prompt holds a video")
                groups = next(embeds)
                stamps = self._timestamps(p)
                request["prompt_token_ids"] = self._collapse_video_groups(p, stamps)
                request["multi_modal_data"] = {"video": {
                    "video_embeds": torch.cat(groups),
                    "video_grid_thw": p.video_grid_thw,
                    "timestamps": [[t] for t in stamps],
                }}
            requests.append(request)
        return requests

    @staticmethod
    def check_expansion(prompts: list[RenderedPrompt], results) -> None:
        """vLLM's expanded prompt must be the rendered one, token for token (positions depend on it)."""
        for i, (p, r) in enumerate(zip(prompts, results)):
            if p.has_video and list(r.prompt_token_ids) != list(p.input_ids):
                raise RuntimeError(f"prompt {i}: vLLM expanded the video placeholders into a different token "
                                   f"sequence ({len(r.prompt_token_ids)} vs {len(p.input_ids)} tokens)")

    def _video_embeddings(self, prompts: list[RenderedPrompt]) -> list[list[torch.Tensor]]:
        """Per prompt, per temporal group: the vision tower's output `[tokens_g, D]` (vLLM's own tower)."""
        pixels = torch.cat([p.pixel_values_videos for p in prompts])
        grid = torch.cat([p.video_grid_thw for p in prompts])

        def encode(model):
            from vllm.model_executor.layers.fusion.mm_input_norm import IdentityInputNorm

            visual = model.visual
            # vLLM's tower normalises raw pixels itself (`input_norm`); ours are normalised already (models/vision.py).
            saved = getattr(visual, "input_norm", None)
            if saved is not None:
                visual.input_norm = IdentityInputNorm()
            try:
                with torch.no_grad():
                    return visual(pixels.to(visual.dtype), grid_thw=grid).cpu()
            finally:
                if saved is not None:
                    visual.input_norm = saved

        out = self.llm.apply_model(encode)[0]
        merge = self.llm.apply_model(lambda model: model.visual.spatial_merge_size)[0]
        sizes = (grid.prod(-1) // merge // merge).tolist()
        per_group = list(out.split(sizes))
        result, k = [], 0
        for p in prompts:
            n = p.video_grid_thw.shape[0]
            result.append(per_group[k : k + n])
            k += n
        return result

    def _collapse_video_groups(self, prompt: RenderedPrompt, stamps: list[float]) -> list[int]:
        """The prompt with each group's `<t seconds><|vision_start|><|video_pad|> x n<|vision_end|>` run replaced
        by one `<|video_pad|>`: vLLM expands every `<|video_pad|>` of a video item into that whole run again
        (its Qwen3-VL prompt update), which gives back exactly `prompt.input_ids`."""
        from models.chat import format_timestamp

        ids, pad = list(prompt.input_ids), self.video_pad
        out, cursor = [], 0
        for start, stamp in zip(self._group_starts(prompt), stamps):
            stamp_ids = self.tokenizer.encode(format_timestamp(stamp), add_special_tokens=False)
            begin = start - len(stamp_ids)
            end = ids.index(self.vision_end, start)
            if ids[begin:start] != stamp_ids or any(t != pad for t in ids[start + 1 : end]):
                raise ValueError(f"video group at token {start} is not laid out as <t seconds><|vision_start|>"
                                 "<|video_pad|>...<|vision_end|>")
            out += ids[cursor:begin] + [pad]
            cursor = end + 1
        return out + ids[cursor:]

    def _group_starts(self, prompt: RenderedPrompt) -> list[int]:
        return [i for i, t in enumerate(prompt.input_ids)
                if t == self.vision_start and i + 1 < len(prompt.input_ids) and prompt.mm_token_type_ids[i + 1] == 2]

    def _timestamps(self, prompt: RenderedPrompt) -> list[float]:
        """The `<t seconds>` text before each `<|vision_start|>` of a video group, read back from the ids."""
        stamps = []
        for i in self._group_starts(prompt):
            text = self.tokenizer.decode(prompt.input_ids[max(0, i - 16) : i])
            match = _STAMP.search(text)
            if match is None:
                raise ValueError(f"video group at token {i} is not preceded by a '<t seconds>' timestamp: {text!r}")
            stamps.append(float(match.group(1)))
        if len(stamps) != prompt.video_grid_thw.shape[0]:
            raise ValueError(f"{len(stamps)} timestamped video groups in the prompt but "
                             f"{prompt.video_grid_thw.shape[0]} rows in video_grid_thw")
        return stamps

    # ------------------------------------------------------------------ weights

    def load_weights(self, state_dict: dict[str, torch.Tensor], last: bool = True) -> None:
        """Push the trainer's weights into the running engine (no restart); logs and records the time. The
        trainer streams them in buckets and `last` marks a sync's final one: the engine collects the buckets and
        reloads once, at the last (vLLM's reload re-packs each MoE layer's experts together on the CPU, so a
        layer must not arrive in parts), then resets its prefix cache, checks the sync (`check_sync`) and goes
        back to sleep."""
        self._pending = {**getattr(self, "_pending", {}), **state_dict}
        if not last:
            return
        state_dict, self._pending = self._pending, {}
        self._wake(tags=["weights"])
        t0 = time.perf_counter()
        self.sync.push(self.llm, state_dict)
        self.llm.reset_prefix_cache()
        record = {"seconds": time.perf_counter() - t0}
        if self.check_sync:
            record["max_logprob_diff"] = self.verify(state_dict)
        self.syncs.append(record)
        log.info("vllm weight sync #%d (%s): %.3f s%s", len(self.syncs), self.sync.name, record["seconds"],
                 f", check max |dlogp| {record['max_logprob_diff']:.2e}" if self.check_sync else "")
        self._sleep()

    def verify(self, state_dict: dict[str, torch.Tensor], probe_len: int = 16) -> float:
        """Max |log-prob difference| between vLLM and transformers (on `state_dict`) over a fixed probe
        sequence; raises when above `check_tolerance`."""
        from transformers import AutoConfig, AutoModelForCausalLM

        from models.batching import token_logprobs
        from models.factory import Qwen3VLMoeForConditionalGeneration

        config = AutoConfig.from_pretrained(self.model_path)
        model = (Qwen3VLMoeForConditionalGeneration(config) if config.model_type == "qwen3_vl_moe"
                 else AutoModelForCausalLM.from_config(config))
        model.load_state_dict({k: v.detach().float().cpu() for k, v in state_dict.items()}, strict=False)
        model.eval()
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, self.vocab_size, (1, probe_len), generator=generator)
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        reference = token_logprobs(logits, ids[:, 1:])[0]
        mine = torch.tensor(self.prompt_logprobs([ids[0].tolist()])[0])
        diff = float((mine - reference).abs().max())
        if diff > self.check_tolerance:
            raise RuntimeError(f"weight sync check failed: vLLM and transformers log-probs differ by {diff:.3e} "
                               f"(> {self.check_tolerance}) after sync #{len(self.syncs) + 1}")
        return diff

    def prompt_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """Log-probs of tokens 1.. of each sequence under the served model (raw logits), one forward each."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False)
        results = self.llm.generate([{"prompt_token_ids": s} for s in sequences], params, use_tqdm=False)
        return [[entry[t].logprob for t, entry in zip(s[1:], r.prompt_logprobs[1:])] for s, r in zip(sequences, results)]

    def sync_stats(self) -> list[dict[str, float]]:
        return list(self.syncs)

    # ------------------------------------------------------------------ sleep / wake

    def _sleep(self) -> None:
        if self.sleep_level and not self._asleep:
            self.llm.sleep(level=self.sleep_level)
            self._asleep = True

    def _wake(self, tags: list[str] | None = None) -> None:
        if self.sleep_level and self._asleep:
            self.llm.wake_up(tags)
            self._asleep = tags is not None

    def close(self) -> None:
        self.sync.close()


__all__ = ["VLLMEngine"]
