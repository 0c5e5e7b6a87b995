"""The DSA Triton kernels through Triton's CPU interpreter (TRITON_INTERPRET=1), against the float64 reference.

Where Triton is installed without a GPU (a developer's CPU machine), this checks the kernels' logic - the tile
path (shared keys merged with the per-query kernel), its backward (several key-range passes and dQ row blocks),
the decode step (both selections) and the streaming selection (rows sorted or not) - before device time is
spent; the speed and the bf16 paths are tested on CUDA in `test_dsa_kernels.py`. The interpreter is chosen when
the kernels are defined, so each check runs in a fresh process. Skipped where Triton is absent (CI). Triton
3.6's interpreter needs numpy < 2.3 (newer numpy refuses its scalar conversions).

    python -m venv /tmp/tri && /tmp/tri/bin/pip install torch==2.13.0 triton==3.6.0 "numpy<2.3" pytest
    /tmp/tri/bin/python -m pytest -q --noconftest tests/test_dsa_kernels_interpreter.py"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("numpy")

ROOT = Path(__file__).resolve().parents[1]

TILE = """
import math, torch
from models.dsa.kernels.triton_sparse_attention import BWD_CONFIG, sparse_attention
from models.dsa.patterns import random_selection, structured_selection
from models.dsa.reference import sparse_attention_ref
torch.manual_seed(0)
L, k, D = 160, 32, 16
# one backward pass with every row's dQ at once; key-range passes with dQ held for 36 rows (40 with tiles of 8),
# reading the (sorted) index rows in place
cases = [(idx, mode, passes) for idx in (structured_selection(L, k, window=8, salient_blocks=2, block=4,
                                                              segment=64, n_random=16), random_selection(L, k))
         for mode in ("on", "off") for passes in ({"key_range": 0, "dq_rows": 0, "sorted": False},
                                                  {"key_range": 48, "dq_rows": 36, "sorted": True})]
for idx, mode, passes in cases:
    BWD_CONFIG.update(key_range=passes["key_range"], dq_rows=passes["dq_rows"])
    q, kk, v = torch.randn(1, 4, L, D), torch.randn(1, 2, L, D), torch.randn(1, 2, L, D)
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, kk, v))
    out = sparse_attention(qr, kr, vr, idx, causal_offset=0, share={"mode": mode, "block_m": 8, "min_share": 2},
                           sorted_rows=passes["sorted"])
    g = torch.randn_like(out)
    out.backward(g)
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, kk, v))
    ref = sparse_attention_ref(q64, k64, v64, idx.long(), 1 / math.sqrt(D))
    ref.backward(g.double())
    for a, b in ((out, ref), (qr.grad, q64.grad), (kr.grad, k64.grad), (vr.grad, v64.grad)):
        err = ((a.double() - b).norm() / b.norm()).item()
        assert err < 1e-5, (mode, passes, err)
print("ok")
"""

DECODE = """
import math, torch
import models.dsa as dsa
from models.dsa.indexer import topk_indices_ref
from models.dsa.kernels.triton_decode import decode_attention, decode_select
from models.dsa.reference import allowed_mask, sparse_attention_ref
g = torch.Generator().manual_seed(0)
b, n, topk = 3, 300, 32
qi, ki, wi = torch.randn(b, 1, 4, 64, generator=g), torch.randn(b, n, 64, generator=g), torch.randn(b, 1, 4, generator=g)
ki[:, 10:30] = ki[:, 5:6]  # tied scores go to the earlier key
wi[1] = -wi[1].abs()  # all-negative weights: ReLU zeros tie everywhere
ki[2, 100:] = ki[2, 50]  # most keys equal: the radix select's earliest-position pass
import models.dsa.kernels.triton_decode as td
import models.dsa.kernels.triton_decode_radix as tr
tr.RADIX_CONFIG.update(chunk=64, block_n=32, block=64)  # several programs per row, several steps per pass
for n_, k_ in ((300, 32), (1000, 200), (257, 256)):
    ki_ = torch.cat([ki] * 4, 1)[:, :n_]
    ref_idx = topk_indices_ref(dsa.indexer_scores_ref(qi, ki_, wi), allowed_mask(None, b, 1, n_, qi.device), k_)
    # torch.topk of the row in one piece or in four pieces then merged; the radix select
    for select, segments in (("torch", 1), ("torch", 4), ("radix", 1)):
        td.DECODE_CONFIG.update(select=select, segments=segments)
        idx = decode_select(qi, ki_, wi, k_)
        for i in range(b):
            assert idx[i, 0].unique().numel() == k_, (select, n_, i)
            assert set(idx[i, 0].tolist()) == set(ref_idx[i, 0].tolist()), (select, segments, n_, i)
q, k, v = torch.randn(b, 8, 1, 32, generator=g), torch.randn(b, 2, n, 32, generator=g), torch.randn(b, 2, n, 32, generator=g)
for k_sel in (32, 24):  # whole slices of 16, and a last slice padded with empty slots
    idx = decode_select(qi, ki, wi, k_sel)
    out = decode_attention(q, k, v, idx, 1 / math.sqrt(32), slots_per_split=16)
    ref = sparse_attention_ref(q.double(), k.double(), v.double(), idx.long(), 1 / math.sqrt(32))
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5, k_sel
print("ok")
"""


SELECT = """
import math, torch
import models.dsa as dsa
from models.dsa.kernels.triton_indexer import indexer_topk
from models.dsa.reference import allowed_mask
torch.manual_seed(0)
lq, topk = 200, 32
qi, ki, wi = torch.randn(1, lq, 4, 64), torch.randn(1, lq, 64), torch.randn(1, lq, 4)
s = dsa.indexer_scores_ref(qi.double(), ki.double(), wi.double())[0]
best = s.masked_fill(~allowed_mask(None, 1, lq, lq, s.device)[0], -math.inf).topk(topk, -1).values
want = best.masked_fill(best == -math.inf, 0).sum(-1)
for sort_rows in (False, True):  # the streaming selection, then the same with every row sorted ascending
    idx = indexer_topk(qi, ki, wi, topk, sort_rows=sort_rows).long()
    got = torch.gather(s, 1, idx[0].clamp(min=0)).masked_fill(idx[0] < 0, 0).sum(-1)
    assert ((got - want).abs() / want.abs().clamp_min(1e-9)).max() < 1e-6, sort_rows
    if sort_rows:
        key = torch.where(idx >= 0, idx, (1 << 40) + torch.arange(topk))
        assert (key[..., 1:] > key[..., :-1]).all()
print("ok")
"""


@pytest.mark.parametrize("script", [TILE, DECODE, SELECT], ids=["tile_sharing", "decode_step", "selection"])
def test_kernels_in_the_triton_interpreter(script):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
