"""Build tiny students and teachers from transformers configs, and load any saved one back.

Families (all real transformers classes, so `save_pretrained` / `from_pretrained` and vLLM know them):
- `qwen3_vl_moe`: vision encoder + projector + MoE language model (the student, and video teachers);
- `qwen3_moe`: text-only MoE language model;
- `qwen3`: text-only dense language model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    Qwen3Config,
    Qwen3MoeConfig,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)

from models.vision import VisionLayout

FAMILIES = ("qwen3_vl_moe", "qwen3_moe", "qwen3")


@dataclass
class TinyModelSpec:
    """Size of a model built from scratch. Every field maps onto the family's transformers config.

    head_dim stays >= 32 because vLLM's CPU attention refuses smaller heads.
    """

    family: str = "qwen3_vl_moe"
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 256
    moe_intermediate_size: int = 128
    num_experts: int = 4
    experts_per_token: int = 2
    vision: dict[str, Any] = field(
        default_factory=lambda: {
            "depth": 1,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 2,
            "patch_size": 8,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "num_position_embeddings": 64,
        }
    )


def _text_kwargs(spec: TinyModelSpec, tokenizer) -> dict[str, Any]:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )


def tiny_config(spec: TinyModelSpec, tokenizer):
    """A transformers config of `spec`'s family sized for CPU training, with the tokenizer's special ids."""
    if spec.family not in FAMILIES:
        raise ValueError(f"unknown model family {spec.family!r}; known: {', '.join(FAMILIES)}")
    text = _text_kwargs(spec, tokenizer)
    moe = dict(
        moe_intermediate_size=spec.moe_intermediate_size,
        num_experts=spec.num_experts,
        num_experts_per_tok=spec.experts_per_token,
    )
    if spec.family == "qwen3":
        return Qwen3Config(**text)
    if spec.family == "qwen3_moe":
        return Qwen3MoeConfig(**text, **moe, norm_topk_prob=True)
    vocab = tokenizer.get_vocab()
    vision = dict(spec.vision, out_hidden_size=spec.hidden_size, deepstack_visual_indexes=[])
    text_config = dict(text, **moe, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                     "mrope_section": _mrope_section(spec.head_dim),
                                                     "mrope_interleaved": True})
    return Qwen3VLMoeConfig(
        text_config=text_config,
        vision_config=vision,
        image_token_id=vocab["<|image_pad|>"],
        video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"],
        vision_end_token_id=vocab["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (time, height, width) in Qwen3-VL's 3:5:5-ish proportions."""
    half = head_dim // 2
    t = half - 2 * (half * 5 // 16)
    return [t, half * 5 // 16, half * 5 // 16]


def build_model(spec: TinyModelSpec, tokenizer, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised model of `spec` (deterministic by seed)."""
    config = tiny_config(spec, tokenizer)
    torch.manual_seed(seed)
    if spec.family == "qwen3_vl_moe":
        return Qwen3VLMoeForConditionalGeneration(config)
    return AutoModelForCausalLM.from_config(config)


INFERENCE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def inference_dtype(name: str, owner: str = "dtype") -> torch.dtype:
    """The torch dtype an inference engine (rollout, teacher) holds its weights in, by name. Lower precision
    halves the bytes every decode step reads (bfloat16 matrix products ran 2.2-2.7x faster on an AVX512-BF16
    CPU); the trainer keeps float32 weights and corrects the sampler/trainer gap like any engine mismatch."""
    if name not in INFERENCE_DTYPES:
        raise ValueError(f"{owner}: {name!r} is not one of {', '.join(INFERENCE_DTYPES)}")
    return INFERENCE_DTYPES[name]


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load a saved model of any supported family (the class is read from its config)."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no model at {path} (config.json missing)")
    config = AutoConfig.from_pretrained(str(path))
    if getattr(config, "dsa", None) or getattr(config.get_text_config(), "dsa", None):
        from models.dsa import load_dsa_model  # a DSA student: indexer weights and settings come back too

        return load_dsa_model(path, dtype=dtype)
    if config.model_type == "qwen3_vl_moe":
        return Qwen3VLMoeForConditionalGeneration.from_pretrained(str(path), dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)


def quiet_libraries() -> None:
    """Silence per-load progress bars of transformers and datasets (a run loads models many times)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:  # only where a task source uses datasets
        import datasets
    except ImportError:
        return
    datasets.disable_progress_bars()


def load_tokenizer(path: str | Path):
    return AutoTokenizer.from_pretrained(str(path))


def vision_layout(model: PreTrainedModel) -> VisionLayout | None:
    """The model's vision layout, or None for a text-only model."""
    return vision_layout_of(model.config)


def vision_layout_of(config) -> VisionLayout | None:
    """The vision layout a model config describes, or None for a text-only one."""
    vision_config = getattr(config, "vision_config", None)
    return None if vision_config is None else VisionLayout.from_config(vision_config)


def save_model(model: PreTrainedModel, tokenizer, path: str | Path, state_dict: dict | None = None) -> None:
    """Save weights (safetensors), config and tokenizer together: every model folder is self-contained.
    `state_dict`: the weights to write instead of the model's own (gathered from shards)."""
    model.save_pretrained(str(path), safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(str(path))
