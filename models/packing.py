"""Shared-prompt packing: a group's prompt once, then its G responses, in one padding-free row.

Layout of one micro-batch, a single row `[1, L]` (no padding anywhere):

    [prompt a][response a0][response a1]...[prompt b][response b0]...

Each response attends to its own prompt and to itself only (`allowed`, the one definition of the mask), and its
positions continue from the prompt exactly as if the sequence prompt + response stood alone (1-D positions, or
Qwen3-VL's 3-D mRoPE ids from the model's own `get_rope_index`). So every response token sees the same keys at
the same relative positions as in the padded unshared batch, its log-prob is the same, and the gradients of all G
responses flow into the one copy of the prompt: a 16K-token video with G = 8 answers of 64 tokens is a forward and
backward over 16K + 8 x 64 tokens instead of 8 x 16.1K.

The attention structure travels as two per-token id vectors (`segment_ids`: which group; `branch_ids`: 0 for a
prompt token, r + 1 for a token of response row r) and becomes, per the model's attention implementation, a
FlexAttention `BlockMask` (CUDA, no DSA; no mask at all for a row that is one causal sequence under `sdpa_flex`), a
boolean `[1, 1, L, L]` mask (sdpa; DSA layers, whose reference path reads the dense mask) or an additive float one
(eager, which adds it to the scores). transformers 5.19 passes any 4-D mask through unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from models.attention import ATTENTION_CHOICES, SDPA_FLEX
from models.chat import RenderedPrompt


def allowed(q_idx, k_idx, q_segment, k_segment, q_branch, k_branch):
    """Whether query q may attend to key k: causal, same group, and k is a prompt token or in q's own response.
    Works elementwise on broadcast tensors (the dense mask) and on FlexAttention's index tensors (its mask_mod)."""
    return (k_idx <= q_idx) & (q_segment == k_segment) & ((k_branch == 0) | (k_branch == q_branch))


def _same_prompt(a: RenderedPrompt, b: RenderedPrompt) -> bool:
    if a is b:
        return True
    if a.input_ids != b.input_ids or a.has_video != b.has_video:
        return False
    if not a.has_video:
        return True
    return torch.equal(a.video_grid_thw, b.video_grid_thw) and torch.equal(a.pixel_values_videos, b.pixel_values_videos)


def shared_prompt_groups(prompts: Sequence[RenderedPrompt], keys: Sequence[Any]) -> list[list[int]]:
    """Rows that can share one copy of their prompt: the same key (a rollout group id, a sample id) and an
    identical prompt (ids and video tensors). Groups ordered by their first row, rows ascending."""
    groups: list[list[int]] = []
    by_key: dict[Any, list[int]] = {}  # key -> indices into `groups`
    for row, (prompt, key) in enumerate(zip(prompts, keys)):
        for g in by_key.setdefault(key, []):
            if _same_prompt(prompts[groups[g][0]], prompt):
                groups[g].append(row)
                break
        else:
            by_key[key].append(len(groups))
            groups.append([row])
    return groups


def resolve_attention(choice: str, device: torch.device | str, packed: bool, dsa: bool = False) -> str | None:
    """The attention implementation to set on a model (None: keep the model's own, sdpa by default). 'auto' is
    sdpa_flex (`models/attention.py`) for shared-prompt packed forwards on CUDA without DSA: a row of several
    responses gets a FlexAttention BlockMask that skips the blocks a response may not see, where sdpa would get a
    dense `[L, L]` mask (4 GiB of bools at a 64K-token packed row); a row that is one causal sequence gets
    cuDNN's causal kernel."""
    if choice not in ATTENTION_CHOICES:
        raise ValueError(f"attention {choice!r} is not one of {', '.join(ATTENTION_CHOICES)}")
    if choice != "auto":
        return choice
    return SDPA_FLEX if packed and not dsa and torch.device(device).type == "cuda" else None


def set_attention(model: nn.Module, impl: str | None) -> None:
    """Switch `model`'s language model (and any vision tower under it) to attention implementation `impl`."""
    if impl is None:
        return
    from models.attention import register
    from models.policy_head import causal_lm

    if impl == SDPA_FLEX:
        register()

    causal_lm(model).set_attn_implementation(impl)


def packed_tokens(prompt_len: int, response_lens: Sequence[int]) -> int:
    """Tokens of one group in a packed row: its prompt once plus every response."""
    return prompt_len + sum(response_lens)


def budget_batches(units: list[list[int]], tokens: list[int], budget: int, max_rows: int = 0) -> list[list[int]]:
    """Whole units (groups of rows) into micro-batches of at most `budget` tokens and `max_rows` rows (0: any),
    first-fit over units sorted longest first; a unit over a limit gets a batch of its own. Deterministic;
    each batch's rows ascending."""
    order = sorted(range(len(units)), key=lambda u: (-tokens[u], units[u][0] if units[u] else 0))
    bins: list[list[int]] = []
    load: list[tuple[int, int]] = []  # (tokens, rows) per bin
    for u in order:
        n = len(units[u])
        for b, (t, r) in enumerate(load):
            if t + tokens[u] <= budget and (not max_rows or r + n <= max_rows):
                bins[b].extend(units[u])
                load[b] = (t + tokens[u], r + n)
                break
        else:
            bins.append(list(units[u]))
            load.append((tokens[u], n))
    return [sorted(b) for b in bins]


@dataclass
class _GroupSpan:
    """Where one group sits in the packed row: its prompt `[start, start + prompt_len)`, each response row's
    first flat position and length, and its rows of `video_grid_thw` (`grid_rows`, a slice)."""

    start: int
    prompt_len: int
    rows: list[int]
    response_starts: list[int]
    response_lens: list[int]
    grid_rows: tuple[int, int] | None


@dataclass
class SharedPromptBatch:
    """One packed row. `input_ids`, `mm_token_type_ids [1, L]`; `segment_ids`, `branch_ids`, `text_positions [L]`;
    `token_index [B, T]`: the flat position of response token t of row b; `predict_index [B, T]`: the flat
    position whose hidden state predicts it (both 0 where `response_mask [B, T]` is 0); video tensors of each
    group's prompt once, or None."""

    input_ids: torch.Tensor
    mm_token_type_ids: torch.Tensor
    segment_ids: torch.Tensor
    branch_ids: torch.Tensor
    text_positions: torch.Tensor
    token_index: torch.Tensor
    predict_index: torch.Tensor
    response_mask: torch.Tensor
    pixel_values_videos: torch.Tensor | None
    video_grid_thw: torch.Tensor | None
    spans: list[_GroupSpan]

    def __len__(self) -> int:
        return self.response_mask.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    @property
    def is_one_sequence(self) -> bool:
        """One group with at most one response: the mask is plain causal attention over the row."""
        return len(self.spans) == 1 and len(self.spans[0].response_lens) <= 1

    def to(self, device: torch.device | str) -> SharedPromptBatch:
        move = lambda t: t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t  # noqa: E731
        return SharedPromptBatch(**{f.name: move(getattr(self, f.name)) for f in fields(self)})

    # ------------------------------------------------------------------ what the model reads

    def dense_mask(self) -> torch.Tensor:
        """`[1, 1, L, L]` bool, True = may attend (`allowed`)."""
        idx = torch.arange(self.num_tokens, device=self.input_ids.device)
        s, b = self.segment_ids, self.branch_ids
        return allowed(idx[:, None], idx[None, :], s[:, None], s[None, :], b[:, None], b[None, :])[None, None]

    def block_mask(self):
        """The same mask as a FlexAttention `BlockMask` (blocks that are entirely masked are skipped)."""
        from torch.nn.attention.flex_attention import create_block_mask

        s, b = self.segment_ids, self.branch_ids

        def mask_mod(_batch, _head, q, k):
            return allowed(q, k, s[q], s[k], b[q], b[k])

        n = self.num_tokens
        # compiled, the mask is evaluated block by block; eager, it is materialised whole ([L, L]: 36 GiB at 70K)
        return create_block_mask(mask_mod, B=1, H=None, Q_LEN=n, KV_LEN=n, device=self.input_ids.device,
                                 _compile=True)

    def attention_mask(self, model: nn.Module) -> Any:
        """The mask in the form `model`'s attention implementation takes (see the module docstring)."""
        from models.policy_head import causal_lm

        lm = causal_lm(model)
        impl = lm.config.get_text_config()._attn_implementation or "eager"
        if impl.startswith("flash_attention"):
            raise ValueError(f"shared-prompt packing needs sdpa, sdpa_flex, eager or flex_attention, not {impl} "
                             "(set trainer.packing: none)")
        has_dsa = any(hasattr(m, "dsa_config") for m in lm.modules())
        if impl in ("flex_attention", SDPA_FLEX) and self.input_ids.is_cuda and not has_dsa:
            if impl == SDPA_FLEX and self.is_one_sequence:
                return None  # plain causal: sdpa's is_causal kernel (see models/attention.py)
            return self.block_mask()
        mask = self.dense_mask()
        if impl == "eager":  # eager (DSA's dense path too) adds the mask to the scores
            dtype = next(lm.parameters()).dtype
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
        return mask

    def position_ids(self, model: nn.Module) -> torch.Tensor:
        """`[1, L]` positions, or `[3, 1, L]` mRoPE ids for a Qwen3-VL model: each group's from the model's
        `get_rope_index` over its prompt + its longest response, as for that sequence alone (response tokens are
        text, so a shorter response's positions are a prefix of the longest one's)."""
        from models.policy_head import causal_lm

        inner = causal_lm(model).model
        if not hasattr(inner, "get_rope_index"):
            return self.text_positions[None]
        out = self.text_positions[None, None].repeat(3, 1, 1)
        if self.video_grid_thw is None:
            return out  # text only: mRoPE ids are the text positions in all three axes
        for span in self.spans:
            if span.grid_rows is None:
                continue
            p = span.prompt_len
            longest = max(span.response_lens, default=0)
            ids = self.input_ids[:, span.start : span.start + p]
            types = self.mm_token_type_ids[:, span.start : span.start + p]
            ids = torch.cat([ids, ids.new_zeros(1, longest)], dim=1)
            types = torch.cat([types, types.new_zeros(1, longest)], dim=1)
            lo, hi = span.grid_rows
            pos, _ = inner.get_rope_index(ids, types, video_grid_thw=self.video_grid_thw[lo:hi])
            out[:, :, span.start : span.start + p] = pos[:, :, :p]
            for start, n in zip(span.response_starts, span.response_lens):
                out[:, :, start : start + n] = pos[:, :, p : p + n]
        return out

    def model_inputs(self, model: nn.Module) -> dict:
        kwargs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask(model),
                  "position_ids": self.position_ids(model)}
        if self.video_grid_thw is not None:
            kwargs.update(mm_token_type_ids=self.mm_token_type_ids, pixel_values_videos=self.pixel_values_videos,
                          video_grid_thw=self.video_grid_thw)
        return kwargs

    def predicting_states(self, hidden: torch.Tensor) -> torch.Tensor:
        """`hidden [1, L, H]` -> `[B, T, H]`: the state that predicts each response token (garbage where masked).
        Positions repeat (a group's responses all start from the prompt's last state; masked slots read 0), so the
        backward sums several gradients into one row: `index_select`'s backward adds them in a fixed order, while
        advanced indexing's adds them with CPU threads racing, and runs of one config came out different."""
        b, t = self.predict_index.shape
        return hidden[0].index_select(0, self.predict_index.reshape(-1)).view(b, t, hidden.shape[-1])

    def response_tokens(self) -> torch.Tensor:
        """The response token ids `[B, T]` (0 where the mask is 0)."""
        return torch.where(self.response_mask > 0, self.input_ids[0][self.token_index], 0)


def pack_shared(prompts: Sequence[RenderedPrompt], responses: Sequence[list[int]], keys: Sequence[Any],
                response_len: int | None = None) -> SharedPromptBatch:
    """Rows grouped by `keys` and identical prompts (`shared_prompt_groups`) packed into one row; the result's
    `[B, T]` tensors follow the input row order, T = `response_len` (default: the longest response, at least 1)."""
    if not (len(prompts) == len(responses) == len(keys)):
        raise ValueError(f"{len(prompts)} prompts, {len(responses)} responses, {len(keys)} keys")
    b = len(prompts)
    t_len = max(1, max((len(r) for r in responses), default=0), response_len or 0)
    ids, types, segments, branches, positions = [], [], [], [], []
    predict = torch.zeros(b, t_len, dtype=torch.long)
    at = torch.zeros(b, t_len, dtype=torch.long)
    resp_mask = torch.zeros(b, t_len, dtype=torch.float32)
    pixels, grids, spans = [], [], []
    cursor, grid_cursor = 0, 0
    for g, rows in enumerate(shared_prompt_groups(prompts, keys)):
        prompt = prompts[rows[0]]
        p = len(prompt.input_ids)
        if p == 0:
            raise ValueError("an empty prompt cannot be packed: nothing would predict its first response token")
        ids.append(torch.tensor(prompt.input_ids, dtype=torch.long))
        types.append(torch.tensor(prompt.mm_token_type_ids, dtype=torch.long))
        segments.append(torch.full((p,), g, dtype=torch.long))
        branches.append(torch.zeros(p, dtype=torch.long))
        positions.append(torch.arange(p))
        grid_rows = None
        if prompt.has_video:
            pixels.append(prompt.pixel_values_videos)
            grids.append(prompt.video_grid_thw)
            grid_rows = (grid_cursor, grid_cursor + prompt.video_grid_thw.shape[0])
            grid_cursor = grid_rows[1]
        span = _GroupSpan(cursor, p, list(rows), [], [], grid_rows)
        cursor += p
        for row in rows:
            r = list(responses[row])
            n = len(r)
            if n > t_len:
                raise ValueError(f"response of row {row} has {n} tokens, more than response_len={t_len}")
            span.response_starts.append(cursor)
            span.response_lens.append(n)
            if n:
                ids.append(torch.tensor(r, dtype=torch.long))
                types.append(torch.zeros(n, dtype=torch.long))
                segments.append(torch.full((n,), g, dtype=torch.long))
                branches.append(torch.full((n,), row + 1, dtype=torch.long))
                positions.append(torch.arange(p, p + n))
                # token 0 is predicted by the prompt's last state, token t by the response's own token t - 1
                predict[row, 0] = span.start + p - 1
                predict[row, 1:n] = torch.arange(cursor, cursor + n - 1)
                at[row, :n] = torch.arange(cursor, cursor + n)
                resp_mask[row, :n] = 1
            cursor += n
        spans.append(span)
    return SharedPromptBatch(
        torch.cat(ids)[None], torch.cat(types)[None], torch.cat(segments), torch.cat(branches), torch.cat(positions),
        at, predict, resp_mask,
        torch.cat(pixels) if pixels else None, torch.cat(grids) if grids else None, spans,
    )


def packed_response_logits(model: nn.Module, batch: SharedPromptBatch) -> torch.Tensor:
    """Logits `[N, V]` of the N real response tokens (row-major over `response_mask`): only the predicting
    positions are projected (`logits_to_keep` as an index tensor), never `[L, V]`."""
    keep = batch.predict_index[batch.response_mask > 0]
    out = model(**batch.model_inputs(model), use_cache=False, logits_to_keep=keep).logits  # [1, N, V]
    return out[0]
