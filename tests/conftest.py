"""Shared fixtures: the project tokenizer (trained once per session) and the real Qwen3 tokenizer (assembled from
the shared vocabulary files, skipped where they are absent), plus small hand-made video samples."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from tasks.base import Sample, VideoPart

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
