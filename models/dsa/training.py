"""Indexer training for the two DSA stages, as the trainer calls them.

Stage "dense_warmup": the main model is frozen and attends densely; only the indexer learns, by
    L_I = mean_t KL( p_t || softmax_s I(t, s) ),  p_t = attention probabilities of query t summed over all heads
    (renormalised), over every allowed past key s.
Stage "sparse": attention uses the top-k set; the main model trains on the task loss while the indexer keeps
    the KL on the selected set only. The indexer's input is detached from the main model's graph and the KL target
    is computed without gradient, so each loss updates only its own parameters. ViT and projector stay frozen.

Typical step (sparse stage):
    set_trainable_for_mode(model, "sparse")
    kl, metrics, out = indexer_kl_loss(model, input_ids, attention_mask, mode="sparse", return_outputs=True,
                                       labels=labels)
    (out.loss + kl).backward()
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .attach import dsa_attention_modules

STAGES = ("dense_warmup", "sparse")
_VISION_PREFIXES = ("visual.", "model.visual.")


def _check_stage(mode: str) -> None:
    if mode not in STAGES:
        raise ValueError(f"indexer training mode must be one of {STAGES}, got {mode!r}")


def indexer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """All parameters of the lightning indexers (the only ones the warm-up trains)."""
    mods = dsa_attention_modules(model)
    if not mods:
        raise ValueError(f"{type(model).__name__} has no DSA attached (call models.dsa.attach_dsa first)")
    return [p for m in mods for p in m.indexer.parameters()]


def set_trainable_for_mode(model: nn.Module, mode: str) -> list[str]:
    """Set requires_grad for a stage and return the names of the trainable parameters.

    dense_warmup: indexers only. sparse: indexers + the language model; vision tower/projector frozen in both.
    """
    _check_stage(mode)
    index_ids = {id(p) for p in indexer_parameters(model)}
    names = []
    for name, p in model.named_parameters():
        if mode == "dense_warmup":
            train = id(p) in index_ids
        else:
            train = id(p) in index_ids or not name.startswith(_VISION_PREFIXES)
        p.requires_grad_(train)
        if train:
            names.append(name)
    return names


def set_loss_mode(model: nn.Module, mode: str | None) -> None:
    """Switch the attention layers for an indexer-loss forward (`mode` a stage) or back to inference (None)."""
    if mode is not None:
        _check_stage(mode)
    for m in dsa_attention_modules(model):
        m.dsa_loss_mode = mode
        m.dsa_mode = "dense" if mode == "dense_warmup" else "sparse"
        m.dsa_last_loss = None
        m.dsa_last_metrics = {}


class IndexerLossCapture:
    """Collects the indexer KL of every DSA layer during one forward run inside `capture_indexer_loss`."""

    def __init__(self, mods: list[nn.Module], mode: str):
        self.mods, self.mode = mods, mode
        self.loss: torch.Tensor | None = None
        self.metrics: dict[str, float] = {}

    def collect(self) -> None:
        losses = [m.dsa_last_loss for m in self.mods if m.dsa_last_loss is not None]
        if len(losses) != len(self.mods):
            raise RuntimeError(f"indexer loss came back from {len(losses)} of {len(self.mods)} DSA layers")
        self.loss = torch.stack([x.float() for x in losses]).mean()
        self.metrics = {"indexer_kl": float(self.loss.detach())}
        if self.mode == "dense_warmup":
            mass = torch.stack([m.dsa_last_metrics["topk_attention_mass"].float() for m in self.mods]).mean()
            self.metrics["topk_attention_mass"] = float(mass)


@contextmanager
def capture_indexer_loss(model: nn.Module, mode: str):
    """Run the forwards inside in stage `mode` and collect the layers' indexer KL (`capture.loss`, averaged over
    layers, and `capture.metrics`: indexer_kl, and for the warm-up topk_attention_mass - the share of the dense
    attention inside the indexer's top-k). The layers are back in inference mode afterwards."""
    _check_stage(mode)
    mods = dsa_attention_modules(model)
    if not mods:
        raise ValueError(f"{type(model).__name__} has no DSA attached (call models.dsa.attach_dsa first)")
    set_loss_mode(model, mode)
    capture = IndexerLossCapture(mods, mode)
    try:
        yield capture
        capture.collect()
    finally:
        for m in mods:
            m.dsa_loss_mode = None
            m.dsa_mode = "sparse"
            m.dsa_last_loss = None
            m.dsa_last_metrics = {}


@contextmanager
def collect_indexer_loss(model: nn.Module, mode: str):
    """Collect the indexer KL of one forward of a model whose layers stay in stage `mode` (`set_loss_mode` once,
    for the model's training life). The stage must outlive the forward: activation checkpointing recomputes each
    layer's forward during backward, outside any context, and a recompute in another stage saves other tensors."""
    mods = dsa_attention_modules(model)
    if not mods or any(m.dsa_loss_mode != mode for m in mods):
        raise RuntimeError(f"collect_indexer_loss: the DSA layers are not in stage {mode!r} (call set_loss_mode)")
    for m in mods:
        m.dsa_last_loss, m.dsa_last_metrics = None, {}
    capture = IndexerLossCapture(mods, mode)
    yield capture
    capture.collect()
    for m in mods:  # the captured loss keeps its graph; the layers keep no reference to it
        m.dsa_last_loss, m.dsa_last_metrics = None, {}


def indexer_kl_loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    mode: str = "dense_warmup", return_outputs: bool = False, **forward_kwargs):
    """Run one forward in the given stage and return the indexer KL averaged over layers.

    input_ids [B, L], attention_mask [B, L] (1 = token) -> (loss, metrics) or (loss, metrics, outputs); see
    `capture_indexer_loss`. Extra kwargs go to the model forward (pixel_values, labels, ...).
    """
    forward_kwargs.setdefault("use_cache", False)
    with capture_indexer_loss(model, mode) as capture:
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs)
    return (capture.loss, capture.metrics, outputs) if return_outputs else (capture.loss, capture.metrics)
