"""DSA settings: what `attach_dsa` adds and what `save_pretrained` stores in the model config (`config.dsa`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

MODES = ("sparse", "dense")


@dataclass
class DSAConfig:
    """Sparse-attention settings shared by every attention layer of one model.

    topk: keys kept per query token (2048 at full scale); a query with fewer candidates keeps all of them.
    index_heads / index_head_dim: size of the lightning indexer (H_I heads of d_I for the query, one key).
    rope_dim: leading index dims that carry rotary embeddings (the rest are position-free, as in DeepSeek-V3.2).
    dense_when_short: when every query has at most `topk` candidates the top-k set is the full causal set, so the
        layer runs the model's own dense attention (same result, no indexer cost) unless an indexer loss is wanted.
    use_kernels: use the Triton kernels for CUDA tensors without a padding mask ("auto" = when Triton imports).
    dense_below: on the kernel path (CUDA, no padding mask, no indexer loss: generation, scoring, serving), query
        tokens at positions below this attend to every earlier token through flash/cuDNN attention and later ones
        to their top-k; below the measured crossover dense attention is the faster (bench/bench_dsa.py). "auto" =
        that crossover (`kernels.DENSE_CROSSOVER`); 0 (default) = top-k for every query with more than `topk`
        candidates. Not the default because it changes what the layer computes below the crossover (a superset of
        the top-k keys) and the reference path and indexer-loss forwards (training the indexer) keep top-k: set
        it where a model is only run, e.g. a serving or rollout copy. It depends only on the query's position,
        so a cached decode step and a full forward agree.
    """

    topk: int = 2048
    index_heads: int = 4
    index_head_dim: int = 64
    rope_dim: int | None = None
    dense_when_short: bool = True
    use_kernels: str = "auto"
    dense_below: int | str = 0

    def __post_init__(self) -> None:
        if self.rope_dim is None:
            self.rope_dim = self.index_head_dim // 2
        if self.topk < 1:
            raise ValueError(f"dsa.topk must be >= 1, got {self.topk}")
        if self.index_heads < 1 or self.index_head_dim < 2:
            raise ValueError(f"dsa.index_heads/index_head_dim too small: {self.index_heads}/{self.index_head_dim}")
        if self.rope_dim % 2 or not 0 <= self.rope_dim <= self.index_head_dim:
            raise ValueError(f"dsa.rope_dim must be even and <= index_head_dim, got {self.rope_dim}")
        if not (self.dense_below == "auto" or (isinstance(self.dense_below, int) and self.dense_below >= 0)):
            raise ValueError(f"dsa.dense_below must be an int >= 0 or 'auto', got {self.dense_below!r}")
        if self.use_kernels not in ("auto", "never", "always"):
            raise ValueError(f"dsa.use_kernels must be auto|never|always, got {self.use_kernels!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DSAConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"config.dsa has unknown keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)
