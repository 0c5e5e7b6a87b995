"""Triton kernels for DSA on CUDA (the PyTorch reference in `models.dsa.reference` serves every other device).

`available()` says whether they can run here; importing this package never requires Triton.
"""

from __future__ import annotations

import torch

# below this many positions a query attends densely on the kernel path (DSAConfig.dense_below = "auto"): the length
# where DSA's prefill (selection + sparse attention) stops being slower than dense SDPA, bench/bench_dsa.py
DENSE_CROSSOVER = 65536


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
