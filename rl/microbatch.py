"""Which rows of a step each training rank and each micro-batch takes.

Ranks get sequences balanced by token count (prompt + response), so no rank waits on a rank with the long
prompts; each rank then walks its rows in length-grouped micro-batches, since a micro-batch pads to its own longest
prompt. Every rank must run the same number of forward passes (FSDP's all-gathers are collectives), so ranks with
fewer micro-batches pad the count with zero-weight repeats (`equalize`).
"""

from __future__ import annotations

import heapq


def partition_by_tokens(lengths: list[int], parts: int) -> list[list[int]]:
    """Split row indices into `parts` lists of near-equal total length: longest rows first, each to the part with
    the fewest tokens so far (ties to the lowest part). Deterministic; each list ascending."""
    heap = [(0, p) for p in range(parts)]
    out: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        total, p = heapq.heappop(heap)
        out[p].append(i)
        heapq.heappush(heap, (total + lengths[i], p))
    return [sorted(rows) for rows in out]


def micro_batches(rows: list[int], lengths: list[int], size: int) -> list[list[int]]:
    """`rows` in micro-batches of at most `size` rows, grouped by length (`lengths` indexed by row)."""
    order = sorted(rows, key=lambda i: (lengths[i], i))
    size = max(1, size)
    return [order[i : i + size] for i in range(0, len(order), size)]
