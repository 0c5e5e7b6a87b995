"""Selection patterns of the sparse-attention benchmark, and the tile split of selections into shared and
private keys (pure PyTorch: runs on the CPU; the kernels that consume the split are tested on CUDA)."""

from __future__ import annotations

import pytest
import torch

from models.dsa.kernels.tile_split import split_tiles
from models.dsa.patterns import adjacent_overlap, random_selection, structured_selection


def _sets(idx: torch.Tensor) -> list[set[int]]:
    return [set(r[r >= 0].tolist()) for r in idx[0]]


@pytest.mark.parametrize("maker", [random_selection, structured_selection])
def test_selections_are_causal_distinct_and_valid_first(maker):
    length, k = 6000, 2048
    idx = maker(length, k, seed=3)
    assert idx.shape == (1, length, k) and idx.dtype == torch.int32
    t = torch.arange(length)[:, None]
    valid = idx[0] >= 0
    assert ((idx[0] <= t) | ~valid).all()
    assert (valid.int().diff(dim=-1) <= 0).all()  # valid-first
    srt = idx[0].sort(-1).values
    assert ((srt[:, 1:] != srt[:, :-1]) | (srt[:, 1:] < 0)).all()  # each key once
    assert torch.equal(valid[:k].sum(-1), torch.arange(1, k + 1))  # short rows: every causal key
    if maker is random_selection:
        assert (valid[k:].sum(-1) == k).all()


def test_structured_selection_has_its_parts():
    idx = structured_selection(16400, seed=1)
    t = 12000
    row = set(idx[0, t][idx[0, t] >= 0].tolist())
    assert set(range(t - 511, t + 1)) <= row  # the trailing window
    salient = row & set(range(0, 8192 - 512))  # this segment's salient blocks lie before it
    same_segment = set(idx[0, 16000][idx[0, 16000] >= 0].tolist())
    shared = salient & same_segment
    assert len(shared) >= 1024  # all 16 blocks of 64 are shared with a later query of the segment
    assert 1900 <= len(row) <= 2048  # 512 random draws, duplicates dropped
    # neighbours share the window and the salient blocks: ~(511 + 1024) / 2048 of each set, plus chance
    assert 0.74 < adjacent_overlap(idx[:, 12000:14000]) < 0.85
    assert adjacent_overlap(random_selection(16400, 2048)[:, 16000:]) < 0.2


@pytest.mark.parametrize("block_m,min_share", [(16, 4), (5, 2), (1, 1)])
def test_tile_split_partitions_every_selection_exactly(block_m, min_share):
    length, k = 1500, 128
    idx = structured_selection(length, k, window=32, salient_blocks=4, block=8, segment=512, n_random=64, seed=2)
    split = split_tiles(idx, block_m=block_m, min_share=min_share, chunk_tiles=7)  # several chunks, partial tile
    want = _sets(idx)
    for t in range(length):
        tile, i = divmod(t, block_m)
        keys, bits = split.shared_idx[0, tile], split.shared_mask[0, tile]
        n_sh = int(split.shared_count[0, tile])
        assert (keys[:n_sh] >= 0).all() and (keys[n_sh:] < 0).all()
        shared = set(keys[(keys >= 0) & (((bits >> i) & 1) == 1)].tolist())
        private_row = split.private_idx[0, t]
        n_pr = int(split.private_count[0, t])
        private = private_row[:n_pr].tolist()
        assert (private_row[n_pr:] < 0).all() and private == sorted(private)
        assert not shared & set(private)
        assert shared | set(private) == want[t], t
    pairs = sum(len(s) for s in want)
    assert split.total_pairs == pairs
    if block_m == 1:  # a tile of one query shares everything with itself
        assert split.shared_pairs == pairs
    else:
        assert 0 < split.shared_pairs < pairs


def test_tile_split_shares_more_of_structured_than_of_random_selections():
    structured = split_tiles(structured_selection(10240, seed=0)[:, 8192:])
    random = split_tiles(random_selection(10240, 2048, seed=0)[:, 8192:])
    assert structured.shared_fraction > 0.6
    assert random.shared_fraction < 0.3


def test_tile_split_of_sorted_rows_skips_the_sort_with_the_same_result():
    """Rows that come sorted (`sorted_rows`, as `indexer_topk(..., sort_rows=True)` writes them) give the split
    that the same selection gives in any order, sorted by the split itself."""
    idx = structured_selection(900, 128, window=32, salient_blocks=4, block=8, segment=256, n_random=64, seed=3)
    g = torch.Generator().manual_seed(0)
    n_valid = (idx >= 0).sum(-1)
    perm = torch.rand(idx.shape, generator=g).masked_fill(idx < 0, 2.0).argsort(-1)  # shuffle the valid slots
    shuffled = idx.gather(-1, perm)
    assert torch.equal((shuffled >= 0).sum(-1), n_valid) and not torch.equal(shuffled, idx)
    a = split_tiles(idx, block_m=8, min_share=2, chunk_tiles=5, sorted_rows=True)
    b = split_tiles(shuffled, block_m=8, min_share=2, chunk_tiles=5)
    for field in ("shared_idx", "shared_mask", "shared_count", "private_idx", "private_count"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert (a.shared_pairs, a.total_pairs) == (b.shared_pairs, b.total_pairs)
