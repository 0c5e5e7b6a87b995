"""Parameter merging of same-origin models: uniform averaging and Task Arithmetic, over state dicts or HF folders.

Same-origin models (one base, each fine-tuned on a domain) live in one weight space, which is what makes a
weighted sum of their parameters a model at all. Two recipes:

    average:          theta = sum_d w_d theta_d                      (w uniform unless given; they sum to 1)
    task arithmetic:  theta = theta_base + lam * sum_d (theta_d - theta_base)          (Ilharco et al., 2023)

Floating-point tensors are combined in float32 (float64 for float64 tensors) and cast back to their own dtype.
Tensors that are not floating point (integer buffers, masks, counters) are not averaged: they are taken from the
reference model (the base for task arithmetic, the first model for averaging). A tensor equal in every model
(a frozen vision tower, a shared embedding) comes out unchanged bit for bit.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

StateDict = Mapping[str, torch.Tensor]

# What a Hugging Face model folder holds besides its weights: copied from the reference folder into a merged one.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class MergeError(ValueError):
    """The models cannot be merged (different tensors or shapes): the message names the tensor and the models."""


def check_same_shapes(state_dicts: Sequence[StateDict], names: Sequence[str] | None = None) -> None:
    """Every state dict has the same tensor names, shapes and dtypes as the first; the error names the first
    tensor that differs and the two models."""
    if not state_dicts:
        raise MergeError("no models to merge")
    names = list(names or [f"model #{i}" for i in range(len(state_dicts))])
    ref, ref_name = state_dicts[0], names[0]
    for sd, name in zip(state_dicts[1:], names[1:]):
        missing = sorted(set(ref) - set(sd))
        extra = sorted(set(sd) - set(ref))
        if missing or extra:
            what = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}, which {ref_name} lacks"
            count = len(missing) + len(extra)
            raise MergeError(f"{name} {what} ({count} tensor name(s) differ from {ref_name}): only models of one "
                             "architecture, fine-tuned from one base, can be merged")
        for key, tensor in ref.items():
            other = sd[key]
            if tuple(other.shape) != tuple(tensor.shape):
                raise MergeError(f"tensor {key!r}: shape {tuple(other.shape)} in {name} but {tuple(tensor.shape)} "
                                 f"in {ref_name}")
            if other.dtype != tensor.dtype:
                raise MergeError(f"tensor {key!r}: dtype {other.dtype} in {name} but {tensor.dtype} in {ref_name}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def average_state_dicts(state_dicts: Sequence[StateDict], weights: Sequence[float] | None = None,
                        names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """`sum_d w_d theta_d` per floating tensor (`weights` default uniform, normalised to sum 1); non-floating
    tensors are the first model's."""
    check_same_shapes(state_dicts, names)
    n = len(state_dicts)
    w = [1.0 / n] * n if weights is None else [float(x) for x in weights]
    if len(w) != n:
        raise MergeError(f"{len(w)} weights for {n} models")
    total = sum(w)
    if not total > 0 or any(x < 0 for x in w):
        raise MergeError(f"merge weights must be >= 0 with a positive sum, got {list(w)}")
    w = [x / total for x in w]
    out: dict[str, torch.Tensor] = {}
    for key, first in state_dicts[0].items():
        if not first.is_floating_point() or all(torch.equal(first, sd[key]) for sd in state_dicts[1:]):
            out[key] = first.clone()
            continue
        acc = torch.zeros(first.shape, dtype=_compute_dtype(first.dtype))
        for wd, sd in zip(w, state_dicts):
            acc += wd * sd[key].to(acc.dtype)
        out[key] = acc.to(first.dtype)
    return out


def task_arithmetic(base: StateDict, finetuned: Sequence[StateDict], lam: float,
                    names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """`theta_base + lam * sum_d (theta_d - theta_base)` per floating tensor; non-floating tensors are the base's.
    (lam = 1/D is uniform averaging of the fine-tuned models.)"""
    if not finetuned:
        raise MergeError("task arithmetic needs at least one fine-tuned model")
    check_same_shapes([base, *finetuned], ["base", *(names or [f"model #{i}" for i in range(len(finetuned))])])
    out: dict[str, torch.Tensor] = {}
    for key, b in base.items():
        if not b.is_floating_point() or all(torch.equal(b, sd[key]) for sd in finetuned):
            out[key] = b.clone()
            continue
        b32 = b.to(_compute_dtype(b.dtype))
        delta = torch.zeros_like(b32)
        for sd in finetuned:
            delta += sd[key].to(b32.dtype) - b32
        out[key] = (b32 + float(lam) * delta).to(b.dtype)
    return out


# ---------------------------------------------------------------------- Hugging Face folders


def load_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved HF model folder (safetensors, sharded or not), without building the model."""
    from models.checkpoint_io import checkpoint_tensors

    return checkpoint_tensors(Path(folder), lambda _key: True)


def save_merged(state_dict: StateDict, reference: str | Path, out: str | Path,
                metadata: Mapping[str, object] | None = None) -> Path:
    """A loadable HF folder at `out`: the merged weights (one safetensors file) beside the reference folder's
    config, tokenizer and other top-level files, plus `merge.json` (how it was made). Written under a temporary
    name, then renamed: a folder at `out` is always complete."""
    from safetensors.torch import save_file

    reference, out = Path(reference).resolve(), Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for item in reference.iterdir():
        if item.is_file() and item.name not in WEIGHT_FILES and not item.name.endswith((".safetensors", ".bin", ".pt")):
            shutil.copy2(item, tmp / item.name)
    if (tmp / "manifest.json").exists():  # a checkpoint's file digests describe the reference, not this folder
        (tmp / "manifest.json").unlink()
    tensors = {k: v.contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "merge.json").write_text(json.dumps(dict(metadata or {}), indent=2, default=str))
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return out


def merge_folders(models: Sequence[str | Path], out: str | Path, method: str = "average",
                  base: str | Path | None = None, lam: float = 1.0, weights: Sequence[float] | None = None) -> Path:
    """Merge saved HF folders of one architecture into a new folder `out`.

    method 'average': uniform (or `weights`) averaging of `models`; 'task_arithmetic': `base` plus `lam` times the
    sum of the models' task vectors. Config and tokenizer come from `base` (else the first model)."""
    names = [str(m) for m in models]
    sds = [load_state_dict(m) for m in models]
    if method == "average":
        merged = average_state_dicts(sds, weights, names)
        meta = {"method": "average", "models": names, "weights": list(weights) if weights else None}
    elif method == "task_arithmetic":
        if base is None:
            raise MergeError("task arithmetic needs the base model folder (`base`)")
        merged = task_arithmetic(load_state_dict(base), sds, lam, names)
        meta = {"method": "task_arithmetic", "base": str(base), "models": names, "lambda": lam}
    else:
        raise MergeError(f"unknown merge method {method!r}; use 'average' or 'task_arithmetic'")
    return save_merged(merged, base if base is not None else models[0], out, meta)
