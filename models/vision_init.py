"""Start a model's vision encoder and projector from another saved model of the same family.

Post-training starts from a pretrained vision tower that the student and its video experts share, and keeps it
frozen. On the embedded default nothing is pretrained, so a job can take the tower of a model that learned to see
(e.g. the video expert) instead of a random one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from models.checkpoint_io import checkpoint_tensors
from models.freezing import FROZEN_PREFIXES


def load_vision_from(model: nn.Module, path: str | Path, prefixes: tuple[str, ...] = FROZEN_PREFIXES) -> list[str]:
    """Copy every vision-tower tensor (names under `prefixes`) of the model saved at `path` into `model`; returns
    the names copied. The source must hold exactly the model's vision tensors, with the same shapes."""
    path = Path(path)
    try:
        source = checkpoint_tensors(path, lambda key: key.startswith(prefixes))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"model.vision_from: {err}") from err
    own = {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}
    if not own:
        raise ValueError("model.vision_from: the student has no vision tower to start")
    missing, unexpected = sorted(own.keys() - source.keys()), sorted(source.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(f"model.vision_from: {path} is not the student's vision tower "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for name, tensor in source.items():
        if tensor.shape != own[name].shape:
            raise ValueError(f"model.vision_from: {path}: {name} has shape {tuple(tensor.shape)}, "
                             f"the student's is {tuple(own[name].shape)}")
    with torch.no_grad():
        for name, tensor in source.items():
            own[name].copy_(tensor)
    return sorted(source)
