"""Split token-level top-k selections into keys shared by a tile of queries and keys private to one query.

Sparse attention is bound by gathering K/V rows (docs/dsa.md, roofline): every (query, selected key) pair loads
the key's K and V rows. Neighbouring queries of trained indexers select many of the same keys (recent context,
the same salient frames). For a tile of `block_m` consecutive queries, a key selected by at least `min_share` of
them is *shared*: the shared-key kernel gathers its rows once for the whole tile and masks per query, so each
query still attends to exactly its own k keys. The rest stay *private* and go through the per-query kernel.
The two partial softmaxes are merged exactly (log-sum-exp), so the result equals one pass over each query's set.

Which keys count as shared only changes speed, never the result. The candidates are the selection of the tile's
last valid query (it sees the most context); each candidate's membership mask over the tile is found by binary
search in the tile's sorted rows. Memory is bounded by working on `chunk_tiles` tiles at a time.

Layout: idx [B, L, K] int32 valid-first (-1 empty) -> `TileSplit` (tensor shapes in its fields).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .stage_clock import StageClock

_BIG = torch.iinfo(torch.int32).max
# profile=True (CUDA): split_tiles records the milliseconds of its stages, summed over chunks, in stage_ms
STATS: dict = {"profile": False, "stage_ms": {}}


@dataclass
class TileSplit:
    """block_m: queries per tile (T = ceil(L / block_m) tiles).
    shared_idx [B, T, S] int32: each tile's shared keys, sorted ascending, -1 past shared_count.
    shared_mask [B, T, S] int32: bit i set when query tile * block_m + i selects that key.
    shared_count [B, T] int32. private_idx [B, L, K] int32: each query's other keys, sorted ascending, valid-first.
    private_count [B, L] int32. shared_pairs / total_pairs: (query, key) pairs served by the shared lists / all."""

    block_m: int
    shared_idx: torch.Tensor
    shared_mask: torch.Tensor
    shared_count: torch.Tensor
    private_idx: torch.Tensor
    private_count: torch.Tensor
    shared_pairs: int
    total_pairs: int

    @property
    def shared_fraction(self) -> float:
        return self.shared_pairs / max(self.total_pairs, 1)


def _split_chunk(rows: torch.Tensor, last: torch.Tensor, min_share: int, clock: StageClock):
    """rows [n, block_m, K] int32 sorted ascending (empty = _BIG); last [n] index of each tile's last valid row.
    -> shared keys [n, K] sorted (_BIG past the shared ones), their masks [n, K], private rows [n, block_m, K]
    sorted (_BIG empty), and the number of (query, key) pairs the shared keys serve (0-d tensor)."""
    n, m, kk = rows.shape
    anchor = rows[torch.arange(n, device=rows.device), last]  # [n, K] sorted
    flat = rows.reshape(n * m, kk)
    values = anchor[:, None, :].expand(n, m, kk).reshape(n * m, kk)
    pos = torch.searchsorted(flat, values).clamp(max=kk - 1)  # where each anchor key would sit in each row
    hit = (flat.gather(1, pos) == values) & (values != _BIG)  # [n m, K]: row i selects anchor key j
    hit = hit.view(n, m, kk)
    bits = (hit.to(torch.int32) << torch.arange(m, device=rows.device, dtype=torch.int32)[None, :, None]).sum(1)
    members = hit.sum(1)
    share = members >= min_share  # [n, K]
    clock.mark("membership")
    drop = (hit & share[:, None, :]).view(n * m, kk)
    keep = torch.ones(n * m, kk, dtype=torch.int8, device=rows.device)
    keep.scatter_reduce_(1, pos, (~drop).to(torch.int8), reduce="amin")
    clock.mark("private drop")
    private = torch.where(keep.bool(), flat, _BIG).sort(-1).values.view(n, m, kk)
    clock.mark("private sort")
    shared_keys, order = torch.where(share, anchor, _BIG).sort(-1)
    bits = bits.gather(1, order)
    clock.mark("shared sort")
    return shared_keys, bits, private, (members * share).sum()


def split_tiles(idx: torch.Tensor, block_m: int = 16, min_share: int = 4, chunk_tiles: int = 1024,
                sorted_rows: bool = False) -> TileSplit:
    """idx [B, L, K] int32 valid-first (-1 empty) -> TileSplit (module docstring). block_m <= 31 (int32 masks).
    sorted_rows: the rows are sorted ascending already (not sorted again)."""
    if not 1 <= block_m <= 31:
        raise ValueError(f"block_m must be in 1..31 (one int32 mask bit per query), got {block_m}")
    b, length, kk = idx.shape
    n_tiles = -(-length // block_m)
    pad = n_tiles * block_m - length
    dev = idx.device
    sh_idx = torch.full((b, n_tiles, kk), -1, dtype=torch.int32, device=dev)
    sh_mask = torch.zeros(b, n_tiles, kk, dtype=torch.int32, device=dev)
    pr_idx = torch.empty(b, n_tiles * block_m, kk, dtype=torch.int32, device=dev)
    shared_pairs = torch.zeros((), dtype=torch.int64, device=dev)
    clock = StageClock(STATS, dev)
    for bi in range(b):
        for t0 in range(0, n_tiles, chunk_tiles):
            t1 = min(n_tiles, t0 + chunk_tiles)
            r0, r1 = t0 * block_m, min(length, t1 * block_m)
            rows = idx[bi, r0:r1]
            clock.mark()
            rows = torch.where(rows >= 0, rows, _BIG)  # valid-first: the empties move to the sorted end
            if not sorted_rows:
                rows = rows.sort(-1).values
            clock.mark("sort rows")
            if r1 - r0 < (t1 - t0) * block_m:  # the last tile is partial: empty rows
                rows = torch.cat([rows, rows.new_full(((t1 - t0) * block_m - (r1 - r0), kk), _BIG)])
            tiles = rows.view(t1 - t0, block_m, kk)
            last = torch.full((t1 - t0,), block_m - 1, dtype=torch.long, device=dev)
            if t1 == n_tiles and pad:
                last[-1] = block_m - 1 - pad
            keys, bits, private, pairs = _split_chunk(tiles, last, min_share, clock)
            shared_pairs += pairs
            sh_idx[bi, t0:t1] = torch.where(keys == _BIG, -1, keys)
            sh_mask[bi, t0:t1] = torch.where(keys == _BIG, 0, bits)
            pr_idx[bi, r0:t1 * block_m] = torch.where(private == _BIG, -1, private).view(-1, kk)
            clock.mark("write")
    pr_idx = pr_idx[:, :length]
    sh_count = (sh_idx >= 0).sum(-1, dtype=torch.int32)
    pr_count = (pr_idx >= 0).sum(-1, dtype=torch.int32)
    width = max(1, int(sh_count.max().item()))
    clock.finish()
    n_shared = int(shared_pairs.item())
    return TileSplit(block_m, sh_idx[..., :width].contiguous(), sh_mask[..., :width].contiguous(), sh_count,
                     pr_idx.contiguous(), pr_count, n_shared, n_shared + int(pr_count.sum().item()))
