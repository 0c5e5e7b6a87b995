"""Which rows of a step each training rank and each micro-batch takes.

Without packing, ranks get sequences balanced by token count (prompt + response), so no rank waits on a rank
with the long prompts; each rank then walks its rows in length-grouped micro-batches, since a micro-batch pads to
its own longest prompt. With shared-prompt packing the unit is a group (one prompt + its responses, counted as
the tokens of its packed form): groups are balanced over ranks by those tokens, then each rank packs whole groups
into micro-batches of a token budget (`models.packing.budget_batches`). Every rank must run the same number of
forward passes (FSDP's all-gathers are collectives), so ranks with fewer micro-batches pad the count with
zero-weight repeats (`equalize`).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Any

from models.packing import packed_tokens, shared_prompt_groups


def resolve_packing(cfg) -> str:
    """`trainer.packing` made concrete: 'auto' is shared_prompt when groups have several responses and no DSA
    indexer stage trains (see the key's help)."""
    mode = cfg.trainer.packing
    if mode == "auto":
        indexer_stage = cfg.model.dsa.enabled and cfg.model.dsa.stage != "none"
        return "none" if indexer_stage or cfg.rollout.group_size == 1 else "shared_prompt"
    return mode


def shared_prompt_units(prompts: Sequence, keys: Sequence[Any], response_lens: Sequence[int]
                        ) -> tuple[list[list[int]], list[int]]:
    """Groups of rows that share one prompt copy (same key, identical prompt) and each group's packed tokens."""
    units = shared_prompt_groups(prompts, keys)
    tokens = [packed_tokens(len(prompts[u[0]].input_ids), [response_lens[i] for i in u]) for u in units]
    return units, tokens


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
