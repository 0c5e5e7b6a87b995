"""Synthetic top-k selections for benchmarks and tests of the sparse attention kernels.

Kernel speed depends on *which* keys neighbouring queries select, not only on how many: a tile of consecutive
queries that shares keys can load each shared K/V row once. Two patterns bracket what trained indexers do:

* `random_selection`: every query's k keys spread at random over its causal past, independently (the worst
  case, no sharing beyond chance);
* `structured_selection`: every query's trailing `window` tokens, `salient_blocks` blocks of `block` tokens that
  all queries of a `segment` share (a new salient set every `segment` positions, drawn from before the segment),
  and `n_random` uniform earlier tokens (duplicates of the other parts dropped) - recent context, the same salient
  frames for nearby queries, and some noise.

Both return valid-first int32 rows [B, L, k] (-1 = empty) and give every query with at most k causal candidates
all of them (exactly dense attention), as `indexer_topk` does. `adjacent_overlap` measures the sharing.
"""

from __future__ import annotations

import torch

_CHUNK = 8192  # rows generated at a time (bounds the int64 temporaries)


def _drop_duplicates(rows: torch.Tensor) -> torch.Tensor:
    """rows [n, k] int64 with -1 empties -> the same rows, each key once (later copies set to -1), valid-first."""
    big = torch.iinfo(torch.int64).max
    srt = torch.where(rows >= 0, rows, big).sort(-1).values
    dup = torch.zeros_like(srt, dtype=torch.bool)
    dup[:, 1:] = srt[:, 1:] == srt[:, :-1]
    srt = torch.where(dup | (srt == big), big, srt).sort(-1).values
    return torch.where(srt == big, -1, srt).to(torch.int32)


def _dense_rows(t: torch.Tensor, k: int) -> torch.Tensor:
    """Rows for queries t [n] with t + 1 <= k: keys 0..t, then -1."""
    j = torch.arange(k, device=t.device)[None, :]
    return torch.where(j <= t[:, None], j, -1)


def random_selection(length: int, k: int, batch: int = 1, seed: int = 0, device="cpu") -> torch.Tensor:
    """Independent uniform top-k sets: query t takes k distinct keys of 0..t (all of them when t + 1 <= k).
    -> [batch, length, k] int32, valid-first, sorted ascending."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = torch.empty(batch, length, k, dtype=torch.int32, device=device)
    for b in range(batch):
        for start in range(0, length, _CHUNK):
            t = torch.arange(start, min(length, start + _CHUNK), device=device)
            # distinct draws: k sorted uniform positions in [0, t + 1 - k], shifted by their rank (stars and bars)
            n_free = (t + 1 - k).clamp(min=0)
            u = torch.rand(len(t), k, device=device, generator=g)
            pos = (u * (n_free[:, None] + 1).to(u.dtype)).floor().long().clamp(max=n_free[:, None])
            rows = pos.sort(-1).values + torch.arange(k, device=device)[None, :]
            short = t + 1 <= k
            rows = torch.where(short[:, None], _dense_rows(t, k), rows)
            out[b, start:start + len(t)] = rows.to(torch.int32)
    return out


def structured_selection(length: int, k: int = 2048, batch: int = 1, seed: int = 0, window: int = 512,
                         salient_blocks: int = 16, block: int = 64, segment: int = 8192, n_random: int = 512,
                         device="cpu") -> torch.Tensor:
    """Trailing window + segment-shared salient blocks + random earlier tokens (module docstring).

    For segment s (queries s * segment ... (s + 1) * segment - 1) the salient blocks are drawn, distinct, among
    the blocks ending before max(s * segment, k) - window, so they never overlap a query's window. Needs
    window + salient_blocks * block + n_random == k. -> [batch, length, k] int32, valid-first, sorted."""
    if window + salient_blocks * block + n_random != k:
        raise ValueError(f"window {window} + salient {salient_blocks}x{block} + random {n_random} must equal k {k}")
    g = torch.Generator(device=device).manual_seed(seed)
    out = torch.empty(batch, length, k, dtype=torch.int32, device=device)
    n_seg = -(-length // segment)
    for b in range(batch):
        salient = []
        for s in range(n_seg):
            n_blocks = (max(s * segment, k) - window) // block
            pick = torch.randperm(n_blocks, device=device, generator=g)[:salient_blocks].sort().values
            salient.append((pick[:, None] * block + torch.arange(block, device=device)[None, :]).reshape(-1))
        salient_t = torch.stack(salient)  # [n_seg, salient_blocks * block], sorted
        for start in range(0, length, _CHUNK):
            t = torch.arange(start, min(length, start + _CHUNK), device=device)
            win = t[:, None] - torch.arange(window, device=device)[None, :]
            sal = salient_t[t // segment]
            # random: uniform over [0, t - window) without the salient positions: draw r among the free
            # positions and map it past the salient ones (c_i = s_i - i counts free positions before s_i)
            n_free = (t - window - salient_blocks * block).clamp(min=1)
            r = (torch.rand(len(t), n_random, device=device, generator=g) * n_free[:, None]).long()
            c = sal - torch.arange(sal.shape[1], device=device)[None, :]
            rnd = r + torch.searchsorted(c.contiguous(), r, right=True)
            rows = _drop_duplicates(torch.cat([win, sal, rnd], dim=1))
            short = t + 1 <= k
            rows = torch.where(short[:, None], _dense_rows(t, k).to(torch.int32), rows)
            out[b, start:start + len(t)] = rows
    return out


def adjacent_overlap(idx: torch.Tensor) -> float:
    """Mean over queries t >= 1 of |S_t & S_{t-1}| / |S_t|: how much of a query's set its predecessor selected.
    idx [B, L, k] int32 valid-first (-1 empty)."""
    total, n = 0.0, 0
    big = torch.iinfo(torch.int32).max
    for b in range(idx.shape[0]):
        for start in range(1, idx.shape[1], _CHUNK):
            end = min(idx.shape[1], start + _CHUNK)
            cur = idx[b, start:end].long()
            prev = torch.where(idx[b, start - 1:end - 1] >= 0, idx[b, start - 1:end - 1], big).sort(-1).values
            pos = torch.searchsorted(prev.long().contiguous(), cur.clamp(min=0).contiguous())
            hit = (prev.long().gather(1, pos.clamp(max=prev.shape[1] - 1)) == cur) & (cur >= 0)
            size = (cur >= 0).sum(-1).clamp(min=1)
            total += (hit.sum(-1).double() / size).sum().item()
            n += end - start
    return total / max(n, 1)
