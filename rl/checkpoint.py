"""Checkpoints: a Hugging Face model folder plus `trainer_state.pt`, written atomically.

A checkpoint is written under a temporary name and renamed into place, so a reader (resume, `eval --watch`)
never sees a half-written one; `latest_checkpoint` ignores temporary folders.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

STEP_DIR = re.compile(r"^step_(\d{6,})$")
STATE_FILE = "trainer_state.pt"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, by step (temporary folders are not complete)."""
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_checkpoint(run_dir: Path, step: int, save_model, trainer_state: dict[str, Any], keep: int = 0) -> Path:
    """`save_model(folder)` writes the model; `trainer_state` goes to trainer_state.pt; then one rename."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.parent / f".tmp_{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_model(tmp)
    torch.save(trainer_state, tmp / STATE_FILE)
    if final.exists():  # re-saving a step (e.g. the end of a resumed run that had already saved it)
        shutil.rmtree(final)
    tmp.rename(final)
    if keep > 0:
        # Keep step 0 (the starting model, the "before" of every comparison) and the newest `keep`.
        steps = [(s, p) for s, p in list_checkpoints(run_dir) if s != 0]
        for _, old in steps[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(folder: Path) -> dict[str, Any]:
    path = Path(folder) / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {folder} has no {STATE_FILE}: it is incomplete")
    return torch.load(path, weights_only=False)
