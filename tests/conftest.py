"""Shared fixtures: the project tokenizer (trained once per session) and the real Qwen3 tokenizer (assembled from
the shared vocabulary files, skipped where they are absent), plus small hand-made video samples."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import mopd  # noqa: F401  (registers the mopd estimator)
from models.factory import TinyModelSpec, build_model, save_model
from rl.config import load_config
from rl.trainer import Trainer
from tasks.base import Sample, VideoPart
from tasks.embedded import embedded_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
QWEN_TOKENIZER_FILES = SHARED_DATA / "qwen_tokenizer"


@pytest.fixture(scope="session")
def project_tokenizer(tmp_path_factory):
    """The embedded suite's byte-level BPE tokenizer (Qwen special tokens, compact chat template)."""
    from tasks.embedded import embedded_tokenizer

    return embedded_tokenizer(tmp_path_factory.mktemp("embedded_tokenizer"))


@pytest.fixture(scope="session")
def qwen3_tokenizer(tmp_path_factory):
    """The real Qwen3 tokenizer: vocab.json + merges.txt + the Qwen3 tokenizer_config.json in one folder
    (the recipe of the shared data's SOURCE.md)."""
    parts = [QWEN_TOKENIZER_FILES / "vocab.json", QWEN_TOKENIZER_FILES / "merges.txt",
             QWEN_TOKENIZER_FILES / "qwen3" / "tokenizer_config.json"]
    if not all(p.exists() for p in parts):
        pytest.skip(f"Qwen3 tokenizer files not found under {QWEN_TOKENIZER_FILES}")
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("qwen3_tokenizer")
    for p in parts:
        shutil.copy(p, folder / p.name)
    return AutoTokenizer.from_pretrained(str(folder))


TOKENIZER_KINDS = ("project", "qwen3")


@pytest.fixture(scope="session", params=TOKENIZER_KINDS)
def any_tokenizer(request):
    """(kind, tokenizer, template_kwargs) for both tokenizers: the project's and the real Qwen3 one."""
    if request.param == "project":
        return "project", request.getfixturevalue("project_tokenizer"), {}
    return "qwen3", request.getfixturevalue("qwen3_tokenizer"), {"enable_thinking": False}


def make_video(n_frames: int = 4, size: int = 32, seed: int = 0, captions: bool = True, start: float = 0.0,
               step: float = 0.5) -> VideoPart:
    """A clip of random uint8 frames `[n_frames, size, size, 3]` with evenly spaced timestamps."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, size=(n_frames, size, size, 3), dtype=np.uint8)
    timestamps = [start + i * step for i in range(n_frames)]
    caps = [f"frame {i} shows a {c} square" for i, c in zip(range(n_frames), ["red", "blue", "green", "gold"] * 8)]
    return VideoPart(frames=frames, timestamps=timestamps, captions=caps if captions else None, fps=1 / step)


def make_video_sample(video: VideoPart, question: str = "When is the red square visible?", sid: str = "vid-0",
                      domain: str = "video", system: str | None = None) -> Sample:
    messages = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": question}]})
    return Sample(id=sid, domain=domain, messages=messages, reference=[0.0, 1.0])


def make_text_sample(text: str = "What is 2 + 3?", sid: str = "txt-0", domain: str = "reasoning") -> Sample:
    return Sample(id=sid, domain=domain, messages=[{"role": "user", "content": text}], reference="5")


# ---------------------------------------------------------------------- tiny training jobs (trainer, eval CLI)

TINY = dict(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=32, intermediate_size=64,
            moe_intermediate_size=32, num_experts=2, experts_per_token=1)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tokenizer, a student and two teachers (one multimodal, one text-only of another family), saved."""
    root = tmp_path_factory.mktemp("ws")
    torch.set_num_threads(1)
    tok = embedded_tokenizer(root / "data")
    save_model(build_model(TinyModelSpec(family="qwen3_vl_moe", **TINY), tok, seed=1), tok, root / "student")
    save_model(build_model(TinyModelSpec(family="qwen3_vl_moe", **TINY), tok, seed=2), tok, root / "teacher_vl")
    save_model(build_model(TinyModelSpec(family="qwen3", **TINY), tok, seed=3), tok, root / "teacher_text")
    return root


def job(workspace: Path, name: str, extra: dict | None = None, overrides: list[str] | None = None):
    data_args = {"data_dir": str(workspace / "data"), "n_train": 16, "n_eval": 4}
    cfg = {
        "run": {"name": name, "dir": str(workspace / "runs"), "seed": 3},
        "model": {"path": str(workspace / "student"), "tokenizer": "model"},
        "data": {
            "train": [{"source": "embedded", "args": {**data_args, "split": "train"}}],
            "eval": [{"source": "embedded", "args": {**data_args, "split": "eval"}}],
            "prompts_per_step": 4,
        },
        "rollout": {"backend": "hf", "num_workers": 0, "group_size": 2, "max_new_tokens": 6},
        "teachers": [
            {"name": "vl", "path": str(workspace / "teacher_vl"), "domains": ["video"], "num_workers": 0},
            {"name": "text", "path": str(workspace / "teacher_text"), "domains": ["retrieval", "tool", "reasoning"],
             "view": "text", "num_workers": 0},
        ],
        "algorithm": {"advantage": "mopd", "policy_loss": "gspo_token"},
        "rewards": {"num_workers": 0},
        "optim": {"lr": 1e-3},
        "trainer": {"steps": 4, "checkpoint_every": 2, "keep_checkpoints": 0, "micro_batch_size": 3,
                    "eval_at_start": True, "eval_teachers": True},
        "eval": {"max_new_tokens": 6},
        "logging": {"progress": False, "tensorboard": False},
    }
    for key, value in (extra or {}).items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    path = workspace / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(path, overrides or [])


def run(cfg_and_resolved) -> Trainer:
    cfg, resolved = cfg_and_resolved
    trainer = Trainer(cfg, resolved)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return trainer


