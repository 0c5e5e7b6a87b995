"""Triton kernels for DSA on CUDA (the PyTorch reference in `models.dsa.reference` serves every other device).

`available()` says whether they can run here; importing this package never requires Triton.
"""

from __future__ import annotations

import torch


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
