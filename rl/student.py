"""Set up the student for training: tokenizer, model (built or loaded), frozen vision, optional LoRA."""

from __future__ import annotations

from pathlib import Path

import torch

from models.factory import TinyModelSpec, build_model, load_model, load_tokenizer, save_model
from models.freezing import freeze_vision

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_tokenizer(cfg, data_dir: str = ".cache/embedded"):
    """`model.tokenizer`: 'model' (the model folder's own), 'embedded' (built once from the embedded suite and
    cached), or a folder."""
    choice = cfg.model.tokenizer
    if choice == "model":
        if cfg.model.path is None:
            raise ValueError("model.tokenizer is 'model' but model.path is null: name a tokenizer or use 'embedded'")
        return load_tokenizer(cfg.model.path)
    if choice == "embedded":
        from tasks.embedded import embedded_tokenizer

        return embedded_tokenizer(data_dir)
    if not Path(choice).exists():
        raise FileNotFoundError(f"model.tokenizer: folder {choice} not found")
    return load_tokenizer(choice)


def build_student(cfg, tokenizer, device: torch.device | str | None = None):
    """The student as the config asks: loaded from `model.path` or built from `model.tiny`; vision frozen.
    `device`: where a model built from scratch is initialised (the training device: no CPU-side init of a large
    random model); the same seed gives the same weights on every rank."""
    if cfg.model.path is not None:
        if not Path(cfg.model.path).exists():
            raise FileNotFoundError(f"model.path: {cfg.model.path} not found")
        model = load_model(cfg.model.path, dtype=DTYPES[cfg.model.dtype])
    else:
        spec = TinyModelSpec(**{k: v for k, v in vars(cfg.model.tiny).items()})
        with torch.device(device or "cpu"):
            model = build_model(spec, tokenizer, seed=cfg.run.seed).to(DTYPES[cfg.model.dtype])
    return _finish(cfg, model, weights=True)


def student_skeleton(cfg):
    """The student loaded from `model.path` as modules on the meta device, without weights: what training ranks
    other than 0 shard before rank 0 broadcasts the weights it loaded (no rank but 0 ever holds a full copy)."""
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(cfg.model.path)
    archs = getattr(config, "architectures", None) or []
    if not archs or not hasattr(transformers, archs[0]):
        raise ValueError(f"{cfg.model.path}/config.json: cannot tell the model class from architectures={archs}")
    saved_dsa = getattr(config, "dsa", None) or getattr(config.get_text_config(), "dsa", None)
    with torch.device("meta"):
        model = getattr(transformers, archs[0])._from_config(config, dtype=DTYPES[cfg.model.dtype])
        if saved_dsa:
            from models.dsa import attach_dsa
            from models.dsa.config import DSAConfig

            attach_dsa(model, **DSAConfig.from_dict(dict(saved_dsa)).to_dict())
        return _finish(cfg, model, weights=False)[0]


def _finish(cfg, model, weights: bool):
    """DSA, its training stage, the vision tower's source and freezing, LoRA: the same on a loaded model and on a
    skeleton (`weights=False`: nothing is read from disk)."""
    dsa = cfg.model.dsa
    if dsa.enabled and not getattr(model.config, "dsa", None):
        from models.dsa import attach_dsa

        attach_dsa(model, topk=dsa.topk, index_heads=dsa.index_heads, index_head_dim=dsa.index_head_dim)
    if dsa.stage != "none":
        if not getattr(model.config, "dsa", None):
            raise ValueError(f"model.dsa.stage={dsa.stage!r} needs a DSA model: set model.dsa.enabled=true")
        from models.dsa.training import set_trainable_for_mode

        set_trainable_for_mode(model, dsa.stage)  # warm-up: indexers only; sparse: indexers + language model
    if cfg.model.vision_from is not None and weights:
        from models.vision_init import load_vision_from

        load_vision_from(model, cfg.model.vision_from)
    frozen = freeze_vision(model) if cfg.model.freeze_vision else []
    if cfg.model.lora.enabled:
        model = _add_lora(model, cfg.model.lora)
    return model, frozen


def _add_lora(model, lora_cfg):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=lora_cfg.target_modules,
        # Only the language model's projections: the vision tower stays frozen and untouched.
        exclude_modules=r".*visual.*",
    )
    return get_peft_model(model, config)


def merged_model(model):
    """The plain transformers model to save or sync: LoRA merged into a copy's weights when present."""
    if hasattr(model, "merge_and_unload"):
        import copy

        return copy.deepcopy(model).merge_and_unload()
    return model


def save_student(model, tokenizer, folder: Path) -> None:
    """Hugging Face folder (merged weights, safetensors) plus, with LoRA, the adapter for resuming."""
    save_model(merged_model(model), tokenizer, folder)
    if hasattr(model, "peft_config"):
        model.save_pretrained(str(Path(folder) / "adapter"))


def student_state_dict(model) -> dict[str, torch.Tensor]:
    """Weights in the plain model's naming (what rollout engines load)."""
    return {k: v.detach() for k, v in merged_state_items(model)}


def merged_state_items(model):
    """(name, tensor) of the weights in the plain model's naming, one at a time. Sharded (FSDP2) tensors come
    back as they are (DTensors) and the caller gathers them one by one; with LoRA (one training rank only, see
    `JobConfig.validate`) they come from a merged copy."""
    if not hasattr(model, "peft_config"):
        yield from model.state_dict().items()
        return
    yield from merged_model(model).state_dict().items()


def student_vision_layout(cfg, tokenizer):
    """The student's vision layout (None for a text-only student) from its config alone: the controller renders
    prompts without holding the model."""
    from models.factory import vision_layout_of

    if cfg.model.path is not None:
        from transformers import AutoConfig

        return vision_layout_of(AutoConfig.from_pretrained(cfg.model.path))
    from models.factory import tiny_config

    return vision_layout_of(tiny_config(TinyModelSpec(**vars(cfg.model.tiny)), tokenizer))
