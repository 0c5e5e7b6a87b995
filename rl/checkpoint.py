"""Checkpoints: complete or absent, verified before use.

A checkpoint folder `checkpoints/step_NNNNNN/` holds
- the consolidated Hugging Face export (config, safetensors, tokenizer): what `vlpost eval`, vLLM and
  transformers load;
- `dcp/`: the student's and optimizer's shards through `torch.distributed.checkpoint` (exact fp32 master weights;
  any world size can load them), and the scheduler;
- `trainer_state.pt`: the controller's state (step, data position, RNG, evaluation history);
- `manifest.json`, written last: every file with its size and BLAKE2b digest.

It is written under a temporary name and renamed into place, so a reader (resume, `eval --watch`) never sees a
half-written one. `latest_checkpoint` checks the manifest and falls back to the newest checkpoint that verifies,
saying which one it skipped and why (a truncated or corrupted file, a folder from an interrupted copy).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

STEP_DIR = re.compile(r"^step_(\d{6,})$")
STATE_FILE = "trainer_state.pt"
MANIFEST = "manifest.json"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Checkpoint folders of a run, by step (temporary folders are not listed; contents are not verified)."""
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: Path, log: Callable[[str], None] = print) -> Path | None:
    """The newest checkpoint that verifies; each newer one that does not is reported through `log` and skipped."""
    for _, folder in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(folder)
        if problem is None:
            return folder
        log(f"checkpoint {folder} is unusable ({problem}): falling back to an earlier one")
    return None


def _digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path) -> None:
    entries = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "blake2b": _digest(p)} for p in _files(folder)}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(entries, indent=1))
    tmp.replace(folder / MANIFEST)


def verify_checkpoint(folder: Path) -> str | None:
    """None when every file the manifest lists is there with its size and digest; else what is wrong."""
    manifest = Path(folder) / MANIFEST
    if not manifest.exists():
        return "no manifest: the checkpoint was not finished"
    try:
        entries = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return "manifest is not valid JSON"
    for name, entry in entries.items():
        path = Path(folder) / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, {entry['bytes']} were written"
        if _digest(path) != entry["blake2b"]:
            return f"{name} is corrupted (digest differs)"
    return None


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, write: Callable[[Path], None], trainer_state: dict[str, Any],
                    keep: int = 0) -> Path:
    """`write(folder)` writes the model (shards and export); `trainer_state` goes to trainer_state.pt; then the
    manifest, then one rename. `keep` > 0 keeps step 0 and the newest `keep` others.

    A folder is only ever removed by renaming it out of the `step_*` namespace first (`_discard`), so a kill at any
    moment leaves each `step_*` folder complete or absent, never half-deleted."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.parent / f".tmp_{final.name}"
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(final.parent)
    tmp.mkdir()
    write(tmp)
    _test_pause(step, "written")
    torch.save(trainer_state, tmp / STATE_FILE)
    write_manifest(tmp)
    _test_pause(step, "manifest")
    if final.exists():  # re-saving a step (e.g. after its earlier checkpoint was found damaged)
        _discard(final)
    tmp.rename(final)
    _test_pause(step, "renamed")
    if keep > 0:
        # Keep step 0 (the starting model, the "before" of every comparison) and the newest `keep`.
        steps = [(s, p) for s, p in list_checkpoints(run_dir) if s != 0]
        for _, old in steps[:-keep]:
            _discard(old)
    return final


def _discard(folder: Path) -> None:
    """Rename out of the checkpoint namespace (atomic), then delete: a kill mid-delete leaves only a `.deleting_*`
    folder, which no reader lists and the next save removes."""
    trash = folder.with_name(f".deleting_{folder.name}")
    if trash.exists():
        shutil.rmtree(trash)
    folder.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def _remove_leftovers(root: Path) -> None:
    """What an interrupted save or delete left behind (`.tmp_*`, `.deleting_*`): never a checkpoint, so removed."""
    for child in root.iterdir():
        if child.name.startswith((".tmp_step_", ".deleting_step_")):
            shutil.rmtree(child, ignore_errors=True)


# Test-only: "<step>:<stage>" holds that checkpoint's save at that stage ("written", "manifest", "renamed") for an
# hour, so that the fault suite (bench/fault_suite.py, tests/test_faults.py) can kill -9 the run exactly there.
TEST_PAUSE_ENV = "VLPOST_TEST_SAVE_PAUSE"


def _test_pause(step: int, stage: str) -> None:
    if os.environ.get(TEST_PAUSE_ENV) == f"{step}:{stage}":
        print(f"test pause: checkpoint step {step} at {stage}", flush=True)
        time.sleep(3600)


def load_trainer_state(folder: Path) -> dict[str, Any]:
    path = Path(folder) / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {folder} has no {STATE_FILE}: it is incomplete")
    return torch.load(path, weights_only=False)
