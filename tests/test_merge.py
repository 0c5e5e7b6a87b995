"""Parameter merging against hand computations: averaging, task arithmetic, dtypes, buffers, shape errors, and a
merged HF folder that transformers loads back."""

from __future__ import annotations

import json

import pytest
import torch

from models.factory import TinyModelSpec, build_model, load_model, save_model
from models.merge import (
    MergeError,
    average_state_dicts,
    load_state_dict,
    merge_folders,
    task_arithmetic,
)


def sd(w, b, steps=0, dtype=torch.float32):
    return {"w": torch.tensor(w, dtype=dtype), "b": torch.tensor(b, dtype=dtype),
            "steps": torch.tensor(steps, dtype=torch.int64)}


def test_average_by_hand():
    out = average_state_dicts([sd([1.0, 2.0], [0.0], 3), sd([3.0, 6.0], [1.0], 5)])
    assert out["w"].tolist() == [2.0, 4.0] and out["b"].tolist() == [0.5]
    assert out["steps"].item() == 3  # not floating: the first model's
    weighted = average_state_dicts([sd([1.0, 2.0], [0.0]), sd([3.0, 6.0], [1.0])], weights=[3, 1])
    assert weighted["w"].tolist() == [1.5, 3.0] and weighted["b"].tolist() == [0.25]


def test_task_arithmetic_by_hand():
    base = sd([1.0, 1.0], [0.0], 7)
    a, b = sd([2.0, 1.0], [1.0], 9), sd([1.0, 3.0], [-1.0], 11)
    # base + 0.5 * ((a - base) + (b - base)) = [1, 1] + 0.5 * ([1, 0] + [0, 2]) = [1.5, 2.0]; b: 0 + 0.5 * 0 = 0
    out = task_arithmetic(base, [a, b], 0.5)
    assert out["w"].tolist() == [1.5, 2.0] and out["b"].tolist() == [0.0]
    assert out["steps"].item() == 7  # the base's
    assert task_arithmetic(base, [a, b], 0.0)["w"].tolist() == [1.0, 1.0]
    # lam = 1/D is averaging of the fine-tuned models
    avg = average_state_dicts([a, b])
    torch.testing.assert_close(task_arithmetic(base, [a, b], 0.5)["w"], avg["w"])


def test_dtype_is_kept_and_equal_tensors_are_untouched():
    a = sd([1.0, 2.0], [0.1], dtype=torch.bfloat16)
    b = sd([2.0, 4.0], [0.1], dtype=torch.bfloat16)
    out = average_state_dicts([a, b])
    assert out["w"].dtype == torch.bfloat16 and out["w"].tolist() == [1.5, 3.0]
    assert torch.equal(out["b"], a["b"])  # equal in both (a frozen tensor): bit for bit
    ta = task_arithmetic(a, [b], 1.0)
    assert ta["w"].dtype == torch.bfloat16 and torch.equal(ta["w"], b["w"])


def test_mismatches_name_the_tensor():
    a = sd([1.0, 2.0], [0.0])
    with pytest.raises(MergeError, match=r"tensor 'w': shape \(3,\) in m2 but \(2,\)"):
        average_state_dicts([a, sd([1.0, 2.0, 3.0], [0.0])], names=["m1", "m2"])
    with pytest.raises(MergeError, match="m2 lacks 'b'"):
        average_state_dicts([a, {"w": a["w"], "steps": a["steps"]}], names=["m1", "m2"])
    with pytest.raises(MergeError, match="dtype"):
        task_arithmetic(a, [sd([1.0, 2.0], [0.0], dtype=torch.float64)], 1.0)


def test_merge_hf_folders(tmp_path, project_tokenizer):
    spec = TinyModelSpec(family="qwen3", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=32,
                         intermediate_size=32)
    paths = []
    for seed in (1, 2, 3):
        path = tmp_path / f"m{seed}"
        save_model(build_model(spec, project_tokenizer, seed=seed), project_tokenizer, path)
        paths.append(path)
    base, a, b = (load_state_dict(p) for p in paths)
    out = merge_folders(paths[1:], tmp_path / "ta", method="task_arithmetic", base=paths[0], lam=0.3)
    merged = load_model(out).state_dict()
    key = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(merged[key], base[key] + 0.3 * ((a[key] - base[key]) + (b[key] - base[key])))
    assert json.loads((out / "merge.json").read_text())["lambda"] == 0.3
    assert (out / "tokenizer.json").exists() or (out / "tokenizer_config.json").exists()
    avg = load_model(merge_folders(paths, tmp_path / "avg")).state_dict()
    torch.testing.assert_close(avg[key], (base[key] + a[key] + b[key]) / 3)
    other = TinyModelSpec(family="qwen3", hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=32,
                          intermediate_size=32)
    save_model(build_model(other, project_tokenizer), project_tokenizer, tmp_path / "wide")
    with pytest.raises(MergeError, match="shape"):
        merge_folders([paths[0], tmp_path / "wide"], tmp_path / "bad")
