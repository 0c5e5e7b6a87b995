"""DeepSeek Sparse Attention (DSA) for Qwen3-family GQA students: lightning indexer, top-k sparse attention,
attach/load helpers, indexer training stages, Triton kernels (CUDA) with a PyTorch reference (everywhere).

    from models.dsa import attach_dsa, load_dsa_model
    model = attach_dsa(model, topk=2048, index_heads=4, index_head_dim=64)
    model.save_pretrained(path); model = load_dsa_model(path)
"""

from .attach import attach_dsa, dsa_attention_modules, is_dsa_model, load_dsa_model, set_dsa_mode
from .config import DSAConfig
from .configs import qwen3_vl_moe_30b_a3b_dsa_config, tiny_text_config, tiny_vl_moe_config
from .indexer import LightningIndexer, indexer_scores_ref, topk_indices_ref
from .reference import allowed_mask, dense_attention_ref, sparse_attention_ref
from .training import STAGES, indexer_kl_loss, indexer_parameters, set_loss_mode, set_trainable_for_mode

__all__ = [
    "DSAConfig", "LightningIndexer", "STAGES", "allowed_mask", "attach_dsa", "dense_attention_ref",
    "dsa_attention_modules", "indexer_kl_loss", "indexer_parameters", "indexer_scores_ref", "is_dsa_model",
    "load_dsa_model", "qwen3_vl_moe_30b_a3b_dsa_config", "set_dsa_mode", "set_loss_mode",
    "set_trainable_for_mode", "sparse_attention_ref", "tiny_text_config", "tiny_vl_moe_config",
    "topk_indices_ref",
]
