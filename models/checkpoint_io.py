"""Read selected tensors from a saved model folder without loading the model."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def checkpoint_tensors(path: Path, wanted) -> dict[str, torch.Tensor]:
    """Read the tensors whose names satisfy `wanted` from the safetensors file(s) of a saved model folder."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    out = {}
    for name in files:
        with safe_open(str(path / name), framework="pt") as f:
            for key in f.keys():
                if wanted(key):
                    out[key] = f.get_tensor(key)
    return out
