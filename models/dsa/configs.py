"""Model configurations with DSA: the Qwen3-VL-30B-A3B student (meta-device sized) and tiny test versions."""

from __future__ import annotations

from typing import Any

from .config import DSAConfig


def qwen3_vl_moe_30b_a3b_dsa_config(topk: int = 2048, index_heads: int = 4, index_head_dim: int = 64):
    """Qwen3-VL-30B-A3B (48 layers, hidden 2048, 32 query / 4 KV heads of 128, 128 experts of 768, 8 active)
    with `config.dsa` set; build it with `torch.device("meta")` to size it without memory, then `attach_dsa`
    with `**config.dsa`."""
    from transformers import Qwen3VLMoeConfig

    text: dict[str, Any] = dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, hidden_act="silu",
        max_position_embeddings=262144, rms_norm_eps=1e-6, attention_bias=False,
        moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1,
        norm_topk_prob=True, mlp_only_layers=[], tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [24, 20, 20],
                         "mrope_interleaved": True},
    )
    vision: dict[str, Any] = dict(
        depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, in_channels=3, patch_size=16,
        spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=2048, num_position_embeddings=2304,
        deepstack_visual_indexes=[8, 16, 24], hidden_act="gelu_pytorch_tanh",
    )
    cfg = Qwen3VLMoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=False)
    cfg.architectures = ["Qwen3VLMoeForConditionalGeneration"]
    cfg.dsa = DSAConfig(topk=topk, index_heads=index_heads, index_head_dim=index_head_dim).to_dict()
    return cfg


def tiny_text_config(family: str = "qwen3_moe", **overrides):
    """A few-layer Qwen3 ('qwen3') or Qwen3-MoE ('qwen3_moe') config for tests and the embedded default."""
    from transformers import Qwen3Config, Qwen3MoeConfig

    base: dict[str, Any] = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                                max_position_embeddings=512, tie_word_embeddings=False)
    if family == "qwen3":
        cls = Qwen3Config
    elif family == "qwen3_moe":
        cls = Qwen3MoeConfig
        base.update(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1)
    else:
        raise ValueError(f"tiny_text_config: unknown family {family!r} (qwen3 | qwen3_moe)")
    base.update(overrides)
    return cls(**base)


def tiny_vl_moe_config(**text_overrides):
    """A two-layer Qwen3-VL-MoE (tiny ViT) config for tests."""
    from transformers import Qwen3VLMoeConfig

    text: dict[str, Any] = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                                moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                max_position_embeddings=512,
                                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                 "mrope_section": [2, 3, 3], "mrope_interleaved": True})
    text.update(text_overrides)
    vision: dict[str, Any] = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
                                  num_position_embeddings=64, deepstack_visual_indexes=[0])
    return Qwen3VLMoeConfig(text_config=text, vision_config=vision)
