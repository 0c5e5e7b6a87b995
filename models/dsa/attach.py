"""Attach DSA to a transformers Qwen3 / Qwen3-MoE / Qwen3-VL(-MoE) language model, and load such a model back.

`attach_dsa` swaps each text attention module's class for a DSA subclass (same parameter names, so every
existing weight stays where it was) and gives it an `indexer` submodule; the settings go to `config.dsa`, so
`save_pretrained` writes both, and `load_dsa_model` rebuilds the model from a saved folder.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from torch import nn

from models.checkpoint_io import checkpoint_tensors

from .attention import DSAAttentionMixin
from .config import MODES, DSAConfig
from .indexer import LightningIndexer

_REQUIRED = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "layer_idx", "head_dim")
_DSA_CLASSES: dict[type, type] = {}


def _dsa_class(base: type) -> type:
    """One cached subclass per attention class: DSA forward first in the MRO, everything else inherited."""
    if base not in _DSA_CLASSES:
        cls = type(f"DSA{base.__name__}", (DSAAttentionMixin, base), {"__module__": __name__})
        cls.dsa_eager = staticmethod(sys.modules[base.__module__].eager_attention_forward)
        _DSA_CLASSES[base] = cls
    return _DSA_CLASSES[base]


def _is_text_attention(module: nn.Module) -> bool:
    return (type(module).__name__.endswith("Attention") and all(hasattr(module, a) for a in _REQUIRED)
            and hasattr(sys.modules[type(module).__module__], "eager_attention_forward"))


def dsa_attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention modules carrying DSA, in layer order."""
    return [m for m in model.modules() if isinstance(m, DSAAttentionMixin)]


def is_dsa_model(model: nn.Module) -> bool:
    return bool(dsa_attention_modules(model))


def _text_config(config):
    return getattr(config, "text_config", None) or config


def attach_dsa(model: nn.Module, topk: int = 2048, index_heads: int = 4, index_head_dim: int = 64,
               rope_dim: int | None = None, dense_when_short: bool = True, use_kernels: str = "auto",
               dense_below: int | str = 0) -> nn.Module:
    """Give every text attention layer of `model` a lightning indexer and the DSA forward; returns `model`.

    Vision attention (fused qkv) is left as it is. The indexer is created in the dtype/device of each layer's
    q_proj. Calling it on a model that already has DSA is an error (its indexer would be replaced).
    Settings: `DSAConfig`.
    """
    cfg = DSAConfig(topk=topk, index_heads=index_heads, index_head_dim=index_head_dim, rope_dim=rope_dim,
                    dense_when_short=dense_when_short, use_kernels=use_kernels, dense_below=dense_below)
    if is_dsa_model(model):
        raise ValueError(f"{type(model).__name__} already has DSA attached")
    targets = [m for m in model.modules() if _is_text_attention(m)]
    if not targets:
        raise ValueError(f"{type(model).__name__}: no Qwen3-family text attention modules found "
                         f"(need {', '.join(_REQUIRED)})")
    text_cfg = _text_config(model.config)
    hidden = text_cfg.hidden_size
    head_dim = getattr(text_cfg, "head_dim", None) or hidden // text_cfg.num_attention_heads
    if cfg.rope_dim > head_dim:
        raise ValueError(f"dsa.rope_dim={cfg.rope_dim} exceeds the model head_dim={head_dim}")
    std = getattr(text_cfg, "initializer_range", 0.02)
    for m in targets:
        w = m.q_proj.weight
        m.__class__ = _dsa_class(type(m))
        m.indexer = LightningIndexer(hidden, cfg.index_heads, cfg.index_head_dim, cfg.rope_dim, init_std=std)
        if w.device.type != "meta":
            m.indexer.to(device=w.device, dtype=w.dtype)
        else:
            m.indexer.to(device="meta", dtype=w.dtype)
        m.dsa_config = cfg
        m.dsa_mode = "sparse"
        m.dsa_loss_mode = None
    model.config.dsa = cfg.to_dict()
    return model


def set_dsa_mode(model: nn.Module, mode: str) -> None:
    """'sparse' (top-k attention, the default) or 'dense' (the model's own attention; indexer still runs)."""
    if mode not in MODES:
        raise ValueError(f"DSA mode must be one of {MODES}, got {mode!r}")
    mods = dsa_attention_modules(model)
    if not mods:
        raise ValueError(f"{type(model).__name__} has no DSA attached")
    for m in mods:
        m.dsa_mode = mode


def load_dsa_model(path: str | Path, model_class: Any = None, **from_pretrained_kwargs) -> nn.Module:
    """Load a model saved after `attach_dsa`: main weights via `from_pretrained`, DSA from `config.dsa`,
    indexer weights from the checkpoint. Every indexer tensor must be present and used (else ValueError).

    model_class: defaults to the class named in `config.architectures[0]` (looked up in transformers).
    """
    import transformers
    from transformers import AutoConfig

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    dsa = getattr(config, "dsa", None) or getattr(_text_config(config), "dsa", None)
    if not dsa:
        raise ValueError(f"{path}/config.json has no 'dsa' entry: not saved from a DSA model")
    if model_class is None:
        archs = getattr(config, "architectures", None) or []
        if not archs or not hasattr(transformers, archs[0]):
            raise ValueError(f"{path}/config.json: cannot tell the model class from architectures={archs}")
        model_class = getattr(transformers, archs[0])
    tf_logger = logging.getLogger("transformers.modeling_utils")
    level = tf_logger.level
    tf_logger.setLevel(logging.ERROR)  # the indexer keys are "unexpected" to the plain class; they load below
    try:
        model, info = model_class.from_pretrained(path, config=config, output_loading_info=True,
                                                  **from_pretrained_kwargs)
    finally:
        tf_logger.setLevel(level)
    if info.get("missing_keys"):
        raise ValueError(f"{path}: weights missing for {sorted(info['missing_keys'])[:5]}")
    attach_dsa(model, **DSAConfig.from_dict(dict(dsa)).to_dict())
    own = {k for k in model.state_dict() if ".indexer." in k}
    saved = checkpoint_tensors(path, lambda key: ".indexer." in key)
    state = {}
    for key, tensor in saved.items():
        match = key if key in own else next((o for o in own if o.endswith(key) or key.endswith(o)), None)
        if match is None:
            raise ValueError(f"{path}: checkpoint tensor {key} matches no indexer parameter of the model")
        state[match] = tensor
    missing = own - set(state)
    if missing:
        raise ValueError(f"{path}: checkpoint lacks indexer tensors {sorted(missing)[:5]}")
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{path}: unexpected indexer keys {result.unexpected_keys[:5]}")
    return model
