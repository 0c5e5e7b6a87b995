"""Freeze the vision encoder and projector: no gradient, no optimizer state, bit-identical weights."""

from __future__ import annotations

from torch import nn

# Parameter-name prefixes of the frozen parts, per family (Qwen3-VL keeps the merger/projector inside `visual`).
FROZEN_PREFIXES = ("model.visual.", "visual.")


def freeze_vision(model: nn.Module, prefixes: tuple[str, ...] = FROZEN_PREFIXES) -> list[str]:
    """Set requires_grad=False on every parameter under the vision tower; returns the frozen names."""
    frozen = []
    for name, param in model.named_parameters():
        if name.startswith(prefixes):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What the optimizer gets: only parameters that require grad (so frozen ones carry no optimizer state)."""
    return [p for p in model.parameters() if p.requires_grad]
