"""Triton kernels for DSA on CUDA (the PyTorch reference in `models.dsa.reference` serves every other device).

`available()` says whether they can run here; importing this package never requires Triton.
"""

from __future__ import annotations

import torch

# below this position a query attends densely on the kernel path (DSAConfig.dense_below = "auto"). From the
# H100 table of bench/bench_dsa.py (docs/dsa.md, round 2): per query at position t, dense attention costs a*t,
# DSA b*t (selection: scores against every earlier key) + c*k (sparse attention); fitted on the 128K random-pattern
# rows, a = 2.84e-8 ms, b = 1.25e-8 ms, c*k = 6.0e-4 ms (fwd) and 3.5e-3 ms with a' = 1.06e-7 ms (fwd+bwd): both
# cross at t* = 37.7K positions; rounded down to a multiple of 4096
DENSE_CROSSOVER = 36864


def available() -> bool:
    """True when Triton imports and a CUDA device is present (or the Triton CPU interpreter is switched on)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    import os

    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def indexer_topk(*args, **kwargs):
    """See `triton_indexer.indexer_topk`."""
    from .triton_indexer import indexer_topk as fn

    return fn(*args, **kwargs)


def sparse_attention(*args, **kwargs):
    """See `triton_sparse_attention.sparse_attention`."""
    from .triton_sparse_attention import sparse_attention as fn

    return fn(*args, **kwargs)


def decode_step(*args, **kwargs):
    """See `triton_decode.decode_step`."""
    from .triton_decode import decode_step as fn

    return fn(*args, **kwargs)
