"""DSA kernels on one GPU: correctness against the float64 PyTorch reference, then timings against dense SDPA.

Shape: the Qwen3-30B-A3B attention (32 query heads, 4 KV heads, head dim 128), batch 1, causal, bf16, top-k 2048,
indexer of 4 heads x 64. Prints a correctness block, then one table row per length and selection pattern (times in ms,
median of CUDA-event timings), then the table again at the end. `--out DIR` also writes the log and a JSON there.
Patterns (`models.dsa.patterns`): independent random selections (the worst case) and a structured one whose
neighbouring queries share keys (trailing window, segment-shared salient blocks, random tokens).

    python bench/bench_dsa.py --lengths 8192 16384 32768 65536 131072 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.dsa.indexer import indexer_scores_ref  # noqa: E402
from models.dsa.kernels import DENSE_CROSSOVER  # noqa: E402
from models.dsa.kernels.tile_split import STATS as SPLIT_STATS  # noqa: E402
from models.dsa.kernels.triton_indexer import STATS as INDEXER_STATS  # noqa: E402
from models.dsa.kernels.triton_indexer import indexer_topk  # noqa: E402
from models.dsa.kernels.triton_sparse_attention import sparse_attention  # noqa: E402
from models.dsa.patterns import adjacent_overlap, random_selection, structured_selection  # noqa: E402
from models.dsa.reference import sparse_attention_ref  # noqa: E402
from timing import graph_time_ms, peak_gib, time_ms  # noqa: E402

HQ, HKV, D = 32, 4, 128
GQA_NATIVE = True  # set False at start-up if the flash backend refuses enable_gqa
HI, DI = 4, 64
LOG: list[str] = []


def say(msg: str = "") -> None:
    print(msg, flush=True)
    LOG.append(msg)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("nan")
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def inputs(lq: int, lk: int, dtype: torch.dtype, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g, dtype=torch.float32)  # noqa: E731
    q, k, v = r(1, HQ, lq, D).to(dtype), r(1, HKV, lk, D).to(dtype), r(1, HKV, lk, D).to(dtype)
    qi, ki, wi = r(1, lq, HI, DI).to(dtype), r(1, lk, DI).to(dtype), r(1, lq, HI)
    return q, k, v, qi, ki, wi


def check_correctness() -> bool:
    """Fresh random inputs per case; kernels vs float64 reference. Returns True when every check passes."""
    ok = True
    say("== correctness (kernel vs float64 reference; fresh random inputs per case)")
    # (L_q, L_k, top-k); L_q < L_k is a prefill/decode step after a KV cache; small max_chunk_elems forces many
    # query chunks in the indexer; the float64 attention check uses the last R query rows (memory)
    cases = [(256, 256, 64), (1500, 1500, 256), (4096, 4096, 2048), (1, 3000, 2048), (7, 5000, 512),
             (3000, 3000, 128), (1024, 4096, 512)]
    for seed, (lq, lk, topk) in enumerate(cases):
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v, qi, ki, wi = inputs(lq, lk, dtype, seed * 10 + (dtype == torch.bfloat16))
            off = lk - lq
            s64 = indexer_scores_ref(qi.double(), ki.double(), wi.double())[0]
            causal = torch.arange(lk, device="cuda")[None, :] <= torch.arange(lq, device="cuda")[:, None] + off
            s64 = s64.masked_fill(~causal, float("-inf"))
            kk = min(topk, lk)
            top = s64.topk(kk, dim=-1)
            ref_sum = top.values.masked_fill(top.values == float("-inf"), 0).sum(-1)
            ref_abs = top.values.masked_fill(top.values == float("-inf"), 0).abs().sum(-1)
            ref_idx = top.indices.masked_fill(top.values == float("-inf"), -1).sort(-1).values
            c_idx, notes = True, []
            for method in ("stream", "chunked"):
                idx = indexer_topk(qi, ki, wi, topk, method=method, max_chunk_elems=lk * 512)
                fb = INDEXER_STATS["fallback_rows"] if method == "stream" else 0
                sel = idx[0].long()
                valid = sel >= 0
                got_sum = torch.gather(s64, 1, sel.clamp(min=0)).masked_fill(~valid, 0).sum(-1)
                n_ok = (valid.sum(-1) == causal.sum(-1).clamp(max=kk)).all().item()
                first = (valid.int().diff(dim=-1) <= 0).all().item() if kk > 1 else True
                in_causal = torch.gather(causal, 1, sel.clamp(min=0))[valid].all().item()
                match = (sel.sort(-1).values == ref_idx).float().mean().item()
                srel = ((got_sum - ref_sum).abs() / ref_abs.clamp_min(1e-9)).max().item()
                # float32: exact up to fp32 rounding; bf16 inputs: the chunked path ranks bf16-rounded scores
                tol_s = 1e-5 if (dtype == torch.float32 or method == "stream") else 2e-3
                good = n_ok and first and in_causal and srel < tol_s
                c_idx &= good
                notes.append(f"{method}: set {match:.3f} sum {srel:.0e} fb {fb}{'' if good else ' BAD'}")
            # sparse attention forward / backward
            rows = min(lq, 384)
            q, idx = q[:, :, -rows:], idx[:, -rows:]
            qr, kr, vr = (x.detach().clone().requires_grad_() for x in (q, k, v))
            out = sparse_attention(qr, kr, vr, idx, 1 / math.sqrt(D), causal_offset=lk - rows)
            gout = torch.randn_like(out)
            out.backward(gout)
            q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
            ref = sparse_attention_ref(q64, k64, v64, idx.long(), 1 / math.sqrt(D))
            ref.backward(gout.double())
            errs = [rel(out, ref), rel(qr.grad, q64.grad), rel(kr.grad, k64.grad), rel(vr.grad, v64.grad)]
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            c_att = all(e < tol for e in errs)  # NaN fails too
            ok &= c_idx and c_att
            say(f"L_q={lq:5d} L_k={lk:5d} k={topk:4d} {str(dtype)[6:]:8s} | indexer {'; '.join(notes)} | "
                f"attn rel err out {errs[0]:.1e} dq {errs[1]:.1e} dk {errs[2]:.1e} dv {errs[3]:.1e} | "
                f"{'PASS' if c_idx and c_att else 'FAIL'}")
    return ok


def timeit(fn, reps: int, warmup: int = 1) -> float:
    """Median CUDA-event ms of `fn` over `reps` calls after `warmup`."""
    return time_ms(fn, torch.device("cuda"), warmup, reps)


def peak(fn) -> float:
    """Peak GiB of one call above what was allocated before it."""
    return peak_gib(fn, torch.device("cuda"))


def dense_times(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, reps: int) -> dict:
    """flash (native GQA) and cuDNN (expanded K/V) SDPA, causal, on q [1, Hq, L, D], k/v [1, Hkv, L, D]: fwd and
    fwd+bwd ms, peak GiB of the faster f+b."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = HQ // HKV
    ke, ve = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)  # expanded outside the timed region
    gd = torch.randn_like(q)
    res: dict = {}
    variants = {"flash": (SDPBackend.FLASH_ATTENTION, k, v, True) if GQA_NATIVE else
                (SDPBackend.FLASH_ATTENTION, ke, ve, False),
                "cudnn": (SDPBackend.CUDNN_ATTENTION, ke, ve, False)}
    mems = {}
    for name, (backend, kk_, vv_, gqa) in variants.items():
        qd, kd, vd = (x.detach().clone().requires_grad_() for x in (q, kk_, vv_))

        def fwd(backend=backend, k_=kk_, v_=vv_, gqa=gqa):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k_, v_, is_causal=True, enable_gqa=gqa)

        def fb(backend=backend, qd=qd, kd=kd, vd=vd, gqa=gqa):
            with sdpa_kernel(backend):
                o = torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=gqa)
            o.backward(gd)
            qd.grad = kd.grad = vd.grad = None

        try:
            res[f"{name}_fwd"] = timeit(fwd, reps)
            res[f"{name}_fb"] = timeit(fb, reps)
            mems[name] = peak(fb)
        except RuntimeError as e:
            say(f"  dense {name} unavailable: {str(e).splitlines()[0][:100]}")
            res[f"{name}_fwd"] = res[f"{name}_fb"] = float("nan")
    fastest = min(mems, key=lambda n: res[f"{n}_fb"]) if mems else None
    res["dense_mem"] = mems[fastest] if fastest else float("nan")
    return res


OFF = {"mode": "off"}  # tile sharing off: the per-query path
ON = {"mode": "on"}  # tile sharing whatever the probe says (for the forward-alone column)
SELECTION_ROWS: list[dict] = []


def selection_overlap(a: torch.Tensor, b: torch.Tensor, topk: int) -> float:
    """Mean |A_t & B_t| / k over the rows with more than k candidates (the others keep every key)."""
    a, b = a[:, topk:].long(), b[:, topk:].long()
    if a.shape[1] == 0:
        return 1.0
    total = 0.0
    for s0 in range(0, a.shape[1], 8192):
        x, y = a[0, s0:s0 + 8192].sort(-1).values, b[0, s0:s0 + 8192].sort(-1).values
        pos = torch.searchsorted(y, x).clamp(max=y.shape[1] - 1)
        total += ((y.gather(1, pos) == x) & (x >= 0)).sum().item()
    return total / (a.shape[1] * topk)


def selection(pattern: str, L: int, topk: int) -> torch.Tensor:
    if pattern == "random":
        return random_selection(L, topk, seed=L, device="cuda")
    return structured_selection(L, topk, seed=L, device="cuda")


def bench_length(L: int, topk: int, patterns: list[str]) -> list[dict]:
    """One row per selection pattern at length L (see the table header for the columns)."""
    import models.dsa.kernels.triton_sparse_attention as sa

    reps = 3 if L >= 65536 else 5
    q, k, v, qi, ki, wi = inputs(L, L, torch.bfloat16, 1234 + L)
    dense = dense_times(q, k, v, reps)
    scale = 1 / math.sqrt(D)
    select_ms = timeit(lambda: indexer_topk(qi, ki, wi, topk, fp8=False), reps)  # streaming selection, bf16
    # what training uses: rows sorted, which the split and the backward then read in place
    select_sorted = timeit(lambda: indexer_topk(qi, ki, wi, topk, fp8=False, sort_rows=True), reps)
    select_fp8 = timeit(lambda: indexer_topk(qi, ki, wi, topk, fp8=True), reps)
    sel = {"L": L, "bf16": select_ms, "fp8": select_fp8,
           "overlap": selection_overlap(indexer_topk(qi, ki, wi, topk, fp8=True),
                                        indexer_topk(qi, ki, wi, topk, fp8=False), topk)}
    SELECTION_ROWS.append(sel)
    say(f"  selection {L // 1024}K: bf16 {select_ms:.1f} ms, fp8 {select_fp8:.1f} ms ({select_ms / select_fp8:.2f}x), "
        f"fp8 set overlap with bf16 {sel['overlap']:.4f}")
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    qs, ks, vs = (x.detach().clone().requires_grad_() for x in (q, k, v))
    gs = torch.randn(1, L, HQ, D, device="cuda", dtype=torch.bfloat16)
    rows = []
    for pattern in patterns:
        idx = selection(pattern, L, topk)
        r = {"L": L, "pattern": pattern, "select": select_ms, "select_sorted": select_sorted, **dense}
        r["overlap"] = adjacent_overlap(idx[:, topk:]) if L > topk else 1.0
        t0 = time.perf_counter()
        split = sa.plan_split(idx, sorted_rows=True)  # the pattern's rows are sorted, as training's are
        torch.cuda.synchronize()
        r["plan_ms"] = (time.perf_counter() - t0) * 1e3
        if split is not None:  # where the split's time goes, stage by stage (its torch ops)
            SPLIT_STATS["profile"] = True
            sa.plan_split(idx, sorted_rows=True)
            SPLIT_STATS["profile"] = False
            r["split_stages"] = dict(SPLIT_STATS["stage_ms"])
        r["shared"] = split.shared_fraction if split is not None else 0.0

        def fwd(share=None, idx=idx):
            return sa.sparse_attention_fwd(qt, kt, vt, idx, scale, 0, split=sa.plan_split(idx, share, backward=False))

        def fb(share=None, idx=idx):
            o = sa.sparse_attention(qs, ks, vs, idx, scale, causal_offset=0, share=share, sorted_rows=True)
            o.backward(gs)
            qs.grad = ks.grad = vs.grad = None

        r["sparse_fwd"] = timeit(fwd, reps)  # SHARE_CONFIG mode (auto): forward alone never splits
        r["tile_fwd"] = timeit(lambda f=fwd: f(ON), reps) if split is not None else float("nan")
        r["sparse_fb"] = timeit(fb, reps)
        if split is not None:  # the tile path against the per-query path on the same inputs
            r["tile_rel"] = rel(fwd(ON)[0], fwd(OFF)[0])
        r["perq_fb"] = timeit(lambda f=fb: f(OFF), reps) if split is not None else r["sparse_fb"]
        r["dsa_fwd"] = select_ms + r["sparse_fwd"]
        r["dsa_fb"] = select_sorted + r["sparse_fb"]

        def dsa_fb(fb=fb):
            ix = indexer_topk(qi, ki, wi, topk, sort_rows=True)  # the selection's memory, then the attention
            del ix
            fb()

        r["dsa_mem"] = peak(dsa_fb)
        for name in ("cudnn", "flash"):
            r[f"x_fwd_{name}"] = dense[f"{name}_fwd"] / r["dsa_fwd"]
            r[f"x_fb_{name}"] = dense[f"{name}_fb"] / r["dsa_fb"]
        rows.append(r)
        torch.cuda.empty_cache()
    return rows


def bench_decode(L: int, batch: int, topk: int) -> dict:
    """One decode step (one new query token per sequence, L cached tokens): DSA (`triton_decode.decode_step`:
    index scores + top-k + split sparse attention) against SDPA over the whole cache, both replayed from CUDA
    graphs. Also checks the DSA step against the float64 reference on the same inputs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from models.dsa.kernels.triton_decode import decode_select, decode_step

    g = torch.Generator(device="cuda").manual_seed(L + batch)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g, dtype=torch.float32)  # noqa: E731
    q, k, v = r(batch, HQ, 1, D).bfloat16(), r(batch, HKV, L, D).bfloat16(), r(batch, HKV, L, D).bfloat16()
    qi, ki, wi = r(batch, 1, HI, DI).bfloat16(), r(batch, L, DI).bfloat16(), r(batch, 1, HI)
    scale = 1 / math.sqrt(D)
    res: dict = {"L": L, "batch": batch}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def dense(backend=backend):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        try:
            res[f"sdpa_{name}"] = graph_time_ms(dense)
        except RuntimeError as e:
            say(f"  decode SDPA {name} unavailable: {str(e).splitlines()[0][:100]}")
            res[f"sdpa_{name}"] = float("nan")
    res["sdpa"] = min(x for x in (res["sdpa_flash"], res["sdpa_cudnn"], res["sdpa_efficient"]) if x == x)
    import models.dsa.kernels.triton_decode as td

    ways = {}  # the radix select; torch.topk of each row in one piece or cut into pieces. The fastest is used
    default = dict(td.DECODE_CONFIG)
    for name, select, n_seg in (("radix", "radix", 1), ("torch", "torch", 1), ("torch/8", "torch", 8),
                                ("torch/32", "torch", 32)):
        td.DECODE_CONFIG.update(select=select, segments=n_seg)
        ways[name] = (graph_time_ms(lambda: decode_select(qi, ki, wi, topk)), select, n_seg)
    chosen = min(ways, key=lambda n: ways[n][0])
    td.DECODE_CONFIG.update(select=ways[chosen][1], segments=ways[chosen][2])
    res["ways"] = {**{n: t for n, (t, _, _) in ways.items()}, "chosen": chosen}
    res["select"] = ways[chosen][0]
    res["dsa"] = graph_time_ms(lambda: decode_step(q, k, v, qi, ki, wi, topk, scale))
    res["x"] = res["sdpa"] / res["dsa"]
    # correctness on these inputs: the selection is the exact top-k of the float64 scores' ranking within fp32
    # rounding (sum of chosen scores), the attention the float64 reference over the chosen keys
    idx = decode_select(qi, ki, wi, topk)
    s64 = indexer_scores_ref(qi.double(), ki.double(), wi.double())
    top = s64.topk(topk, dim=-1).values
    got = torch.gather(s64, -1, idx.long()).sum(-1)
    # relative to the chosen scores' magnitude (a sequence whose weights are all negative has best scores of 0)
    res["select_rel"] = ((top.sum(-1) - got).abs() / top.abs().sum(-1).clamp_min(1e-300)).max().item()
    out = decode_step(q, k, v, qi, ki, wi, topk, scale)
    ref = sparse_attention_ref(q.double(), k.double(), v.double(), idx.long(), scale)
    res["out_rel"] = rel(out, ref)
    picked = {}
    for select in ("radix", "torch"):  # the two selections agree exactly (as sets) on these inputs
        td.DECODE_CONFIG.update(select=select, segments=1)
        picked[select] = decode_select(qi, ki, wi, topk).sort(-1).values
    res["radix_equal"] = bool(torch.equal(picked["radix"], picked["torch"]))
    td.DECODE_CONFIG.update(default)
    return res


def share_sweep(L: int, topk: int) -> None:
    """Time tile-sharing settings (queries per tile, queries that must share a key, tile-kernel launch settings)
    on the structured pattern at one length; the fastest forward+backward becomes the default for the table."""
    import models.dsa.kernels.triton_shared_attention as sh
    import models.dsa.kernels.triton_sparse_attention as sa

    q, k, v, _, _, _ = inputs(L, L, torch.bfloat16, 77)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    idx = selection("structured", L, topk)
    qs, ks, vs = (x.detach().clone().requires_grad_() for x in (q, k, v))
    gs = torch.randn(1, L, HQ, D, device="cuda", dtype=torch.bfloat16)
    scale = 1 / math.sqrt(D)

    def fb(share):
        o = sa.sparse_attention(qs, ks, vs, idx, scale, causal_offset=0, share=share)
        o.backward(gs)
        qs.grad = ks.grad = vs.grad = None

    best = (float("inf"), None)
    for block_m, min_share in ((16, 4), (16, 2), (16, 8), (8, 2), (8, 4)):
        share = {"mode": "on", "block_m": block_m, "min_share": min_share}
        t0 = time.perf_counter()
        split = sa.plan_split(idx, share)
        torch.cuda.synchronize()
        plan = (time.perf_counter() - t0) * 1e3
        fwd = timeit(lambda s=split: sa.sparse_attention_fwd(qt, kt, vt, idx, scale, 0, split=s), 3)
        ms = timeit(lambda s=share: fb(s), 3)
        say(f"share sweep {L // 1024}K {share}: shared {split.shared_fraction:.2f}, plan {plan:.1f} ms, "
            f"fwd (no planning) {fwd:.1f} ms, f+b (planning included) {ms:.1f} ms")
        if ms < best[0]:
            best = (ms, share)
    sa.SHARE_CONFIG.update(best[1], mode="auto")
    split = sa.plan_split(idx, dict(sa.SHARE_CONFIG, mode="on"))
    out, lse = torch.empty_like(qt), torch.empty(1, L, HQ, device="cuda")
    for cfg in ({"block_n": 64, "num_warps": 8, "num_stages": 2}, {"block_n": 32, "num_warps": 4, "num_stages": 2},
                {"block_n": 64, "num_warps": 4, "num_stages": 3}, {"block_n": 128, "num_warps": 8, "num_stages": 2}):
        ms = timeit(lambda c=cfg: sh.shared_attention_fwd(qt, kt, vt, split, scale, out, lse, c), 3)
        say(f"share sweep {L // 1024}K tile forward kernel {cfg}: {ms:.1f} ms")
    say(f"chosen: {sa.SHARE_CONFIG}")


def indexer_variants(L: int, topk: int) -> None:
    """Time the selection's alternatives at one length (append modes, final cut, chunked path; the append mode and
    final cut that are fastest become the defaults for the table) and its speed and peak memory against
    SELECT_MEMORY (reported only: the default trades speed for memory)."""
    import models.dsa.kernels.triton_indexer as ti

    _, _, _, qi, ki, wi = inputs(L, L, torch.bfloat16, 1234 + L)
    finals = {}
    for final in ("radix", "torch"):  # how each candidate list is cut to k
        ti.FINAL_SELECT = final
        finals[final] = timeit(lambda: indexer_topk(qi, ki, wi, topk), 3)
    ti.FINAL_SELECT = min(finals, key=finals.get)
    appends = {}
    for mode in ("atomic", "scan", "loop"):  # how the fused pass appends candidates
        ti.SELECT_APPEND = mode
        appends[mode] = timeit(lambda: indexer_topk(qi, ki, wi, topk), 3)
    ti.SELECT_APPEND = min(appends, key=appends.get)
    chunked = timeit(lambda: indexer_topk(qi, ki, wi, topk, method="chunked"), 3)
    default_mem = ti.SELECT_MEMORY
    for mem_gib in (0.5, 1, 2, 4, 64):  # candidate lists held at once (64 GiB: every row at once, round 1)
        ti.SELECT_MEMORY = int(mem_gib * 2**30)
        ms = timeit(lambda: indexer_topk(qi, ki, wi, topk), 3)
        say(f"selection at {L // 1024}K with SELECT_MEMORY {mem_gib} GiB: {ms:.1f} ms, peak "
            f"{peak(lambda: indexer_topk(qi, ki, wi, topk)):.2f} GiB")
    ti.SELECT_MEMORY = default_mem
    INDEXER_STATS["profile"] = True
    indexer_topk(qi, ki, wi, topk)
    INDEXER_STATS["profile"] = False
    stages = " ".join(f"{k}={v:.1f}" for k, v in INDEXER_STATS["stage_ms"].items())
    say(f"selection at {L // 1024}K: final cut {finals} -> {ti.FINAL_SELECT}; append {appends} -> "
        f"{ti.SELECT_APPEND}; chunked path {chunked:.1f} ms; streaming stages ms: {stages}")


def sweep(L: int, topk: int) -> None:
    """Time launch settings of the sparse kernels at one length and make the fastest the default for the table;
    each setting is first checked against the default's result on a small problem."""
    import models.dsa.kernels.triton_sparse_attention as sa

    q, k, v, qi, ki, wi = inputs(L, L, torch.bfloat16, 99)
    idx = indexer_topk(qi, ki, wi, topk)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    scale = 1 / math.sqrt(D)
    q2, k2, v2, qi2, ki2, wi2 = inputs(3000, 3000, torch.bfloat16, 98)
    idx2 = indexer_topk(qi2, ki2, wi2, 512)
    g2 = torch.randn(1, 3000, HQ, D, device="cuda", dtype=torch.bfloat16)
    q2t, k2t, v2t = (x.transpose(1, 2) for x in (q2, k2, v2))
    o_ref, lse_ref = sa.sparse_attention_fwd(q2t, k2t, v2t, idx2, scale, 0)
    d_ref = sa.sparse_attention_bwd(q2t, k2t, v2t, idx2, o_ref, lse_ref, g2, scale, 0)
    best = {}
    rows, _, n_pass = sa.key_range_segments(idx, L, sa.BWD_CONFIG["key_range"], 0)
    ms = timeit(lambda: sa.key_range_segments(idx, L, sa.BWD_CONFIG["key_range"], 0), 3)
    say(f"sweep L={L // 1024}K key-range segments (sort + searchsorted, {n_pass} passes): {ms:8.1f} ms")
    fwd_cfgs = [(64, 4, 2), (64, 4, 1), (64, 8, 2), (32, 4, 2), (128, 4, 2)]
    # (block_k, warps, stages, key_range); key_range 0 = the one-pass backward of earlier versions
    bwd_cfgs = [(32, 4, 2, 0), (32, 4, 2, 8192), (32, 4, 3, 8192), (32, 4, 2, 16384), (32, 4, 2, 4096),
                (64, 4, 2, 8192), (32, 8, 2, 8192), (16, 4, 3, 8192)]
    for kind, configs in (("fwd", fwd_cfgs), ("bwd", bwd_cfgs)):
        for c in configs:
            cfg = {"block_k": c[0], "num_warps": c[1], "num_stages": c[2]}
            if kind == "fwd":
                o2, _ = sa.sparse_attention_fwd(q2t, k2t, v2t, idx2, scale, 0, cfg)
                err = rel(o2, o_ref)
                ms = timeit(lambda c=cfg: sa.sparse_attention_fwd(qt, kt, vt, idx, scale, 0, c), 3)
            else:
                cfg["key_range"] = c[3]
                small = dict(cfg, key_range=min(c[3], 1024))  # several passes on the small check problem too
                d2 = sa.sparse_attention_bwd(q2t, k2t, v2t, idx2, o_ref, lse_ref, g2, scale, 0, small)
                err = max(rel(a, b) for a, b in zip(d2, d_ref))
                o, lse = sa.sparse_attention_fwd(qt, kt, vt, idx, scale, 0)
                gg = torch.randn_like(o)
                ms = timeit(lambda c=cfg, o=o, lse=lse, gg=gg: sa.sparse_attention_bwd(qt, kt, vt, idx, o, lse, gg,
                                                                                        scale, 0, c), 3)
            say(f"sweep L={L // 1024}K {kind} {cfg}: {ms:8.1f} ms (rel diff to default {err:.1e})")
            if err < 1e-2 and ms < best.get(kind, (float("inf"),))[0]:
                best[kind] = (ms, cfg)
    sa.FWD_CONFIG.update(best["fwd"][1])
    sa.BWD_CONFIG.update(best["bwd"][1])
    say(f"chosen: fwd {sa.FWD_CONFIG} bwd {sa.BWD_CONFIG}")


def sweep_indexer(L: int, topk: int) -> None:
    """Time launch settings of the fused score + select pass (register-counter loop) at one length; each is first
    checked to give the same selection as the default on a small problem; the fastest becomes the default."""
    import models.dsa.kernels.triton_indexer as ti

    _, _, _, qi, ki, wi = inputs(L, L, torch.bfloat16, 97)
    _, _, _, qi2, ki2, wi2 = inputs(3000, 3000, torch.bfloat16, 96)
    ref = indexer_topk(qi2, ki2, wi2, 512).sort(-1).values
    default = dict(ti.SELECT_CONFIG)
    best = (float("inf"), default)
    for bm, bn, w, st in [(64, 128, 8, 2), (64, 64, 4, 2), (64, 64, 8, 2), (32, 128, 4, 2), (64, 128, 8, 3),
                          (128, 64, 8, 2), (64, 128, 4, 2)]:
        ti.SELECT_CONFIG = {"block_m": bm, "block_n": bn, "num_warps": w, "num_stages": st}
        same = torch.equal(indexer_topk(qi2, ki2, wi2, 512).sort(-1).values, ref)
        ms = timeit(lambda: indexer_topk(qi, ki, wi, topk), 3)
        say(f"sweep L={L // 1024}K indexer select {ti.SELECT_CONFIG}: {ms:8.1f} ms (same selection: {same})")
        if same and ms < best[0]:
            best = (ms, dict(ti.SELECT_CONFIG))
    ti.SELECT_CONFIG = best[1]
    say(f"chosen: indexer select {ti.SELECT_CONFIG}")


HEADER = ("|    L | pattern | overlap | shared | flash fwd | flash f+b | cuDNN fwd | cuDNN f+b | select "
          "| sparse fwd | (tile fwd) | sparse f+b | (per-query f+b) | DSA fwd | DSA f+b | fwd x cuDNN "
          "| f+b x cuDNN | fwd x flash | f+b x flash | mem dense GiB | mem DSA GiB |")


def row(r: dict) -> str:
    return (f"| {r['L'] // 1024:3d}K | {r['pattern']:10s} | {r['overlap']:7.2f} | {r['shared']:6.2f} "
            f"| {r['flash_fwd']:9.1f} | {r['flash_fb']:9.1f} | {r['cudnn_fwd']:9.1f} | {r['cudnn_fb']:9.1f} "
            f"| {r['select']:6.1f} | {r['sparse_fwd']:10.1f} | {r['tile_fwd']:10.1f} | {r['sparse_fb']:10.1f} "
            f"| {r['perq_fb']:15.1f} | {r['dsa_fwd']:7.1f} | {r['dsa_fb']:7.1f} | {r['x_fwd_cudnn']:11.2f} "
            f"| {r['x_fb_cudnn']:11.2f} | {r['x_fwd_flash']:11.2f} | {r['x_fb_flash']:11.2f} "
            f"| {r['dense_mem']:13.2f} | {r['dsa_mem']:11.2f} |")


DECODE_HEADER = ("|    L | batch | SDPA flash | SDPA cuDNN | SDPA efficient | DSA select | DSA step | x (best SDPA / DSA) "
                 "| select rel err | out rel err |")


def decode_row(r: dict) -> str:
    return (f"| {r['L'] // 1024:3d}K | {r['batch']:5d} | {r['sdpa_flash']:10.3f} | {r['sdpa_cudnn']:10.3f} "
            f"| {r['sdpa_efficient']:14.3f} | {r['select']:10.3f} | {r['dsa']:8.3f} | {r['x']:18.2f} "
            f"| {r['select_rel']:14.1e} | {r['out_rel']:11.1e} |")


def sa_share() -> dict:
    import models.dsa.kernels.triton_sparse_attention as sa

    return sa.SHARE_CONFIG


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="*", default=[8192, 16384, 32768, 65536, 131072])
    ap.add_argument("--topk", type=int, default=2048)
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--sweep-length", type=int, default=0,
                    help="time launch settings of the fused indexer select and the sparse kernels at this "
                         "length first (the fastest become the defaults for the table; 0 = keep the defaults)")
    ap.add_argument("--patterns", nargs="+", default=["random", "structured"], choices=["random", "structured"])
    ap.add_argument("--indexer-variants", type=int, default=0,
                    help="time the selection's alternatives (append modes, final cut, chunked path) at this "
                         "length first; the fastest become the defaults (0 = keep the defaults)")
    ap.add_argument("--decode-lengths", type=int, nargs="*", default=[32768, 131072],
                    help="cached tokens for the decode-step table (none: skip it)")
    ap.add_argument("--decode-batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--share-sweep", type=int, default=0,
                    help="time tile-sharing settings on the structured pattern at this length first")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_dsa needs a CUDA GPU (the CPU keeps the PyTorch reference only)")
    import triton

    say(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    global GQA_NATIVE
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            t = torch.randn(1, HQ, 256, D, device="cuda", dtype=torch.bfloat16)
            u = torch.randn(1, HKV, 256, D, device="cuda", dtype=torch.bfloat16)
            torch.nn.functional.scaled_dot_product_attention(t, u, u, is_causal=True, enable_gqa=True)
    except RuntimeError as e:
        GQA_NATIVE = False
        say(f"flash SDPA without enable_gqa ({str(e).splitlines()[0][:80]}); dense K/V are expanded")
    ok = True if args.skip_check else check_correctness()
    say(f"correctness: {'ALL PASS' if ok else 'FAILURES'}")
    if args.share_sweep:
        share_sweep(args.share_sweep, args.topk)
        torch.cuda.empty_cache()
    if args.indexer_variants:
        indexer_variants(args.indexer_variants, args.topk)
    if args.sweep_length:
        sweep_indexer(args.sweep_length, args.topk)
        sweep(args.sweep_length, args.topk)
        torch.cuda.empty_cache()
    rows = []
    say("times in ms (median of CUDA-event timings). overlap: mean share of a query's set its predecessor also "
        "selected; shared: share of (query, key) pairs served by tile-shared keys (0 = the per-query path was "
        "chosen); select = indexer + top-k (streaming), on random indexer inputs; sparse = attention over the "
        "pattern's selection (tile sharing auto, its planning included; a forward alone runs per query); "
        "(tile fwd) = forward with the split forced on; (per-query) = sharing off; "
        "DSA = select + sparse (fwd+bwd: the selection with its rows sorted, which the split and the backward read "
        "in place; its time after each row); x = dense / DSA")
    say(HEADER)
    for L in args.lengths:
        t0 = time.time()
        try:
            new_rows = bench_length(L, args.topk, args.patterns)
        except Exception as e:  # out of memory or a kernel failure: report it and go on to the next length
            say(f"| {L // 1024}K | {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''} |")
            torch.cuda.empty_cache()
            continue
        rows += new_rows
        for r in new_rows:
            check = f", tile vs per-query output rel diff {r['tile_rel']:.1e}" if "tile_rel" in r else ""
            if "split_stages" in r:
                check += "; split stages ms: " + " ".join(f"{k}={v:.1f}" for k, v in r["split_stages"].items())
            say(row(r) + f"  (select with sorted rows {r['select_sorted']:.1f} ms; split planning "
                f"{r['plan_ms']:.1f} ms{check}; {time.time() - t0:.0f}s)")
        torch.cuda.empty_cache()
    decode_rows = []
    if args.decode_lengths:
        say("")
        say(DECODE_HEADER)
        for L in args.decode_lengths:
            for batch in args.decode_batches:
                try:
                    decode_rows.append(bench_decode(L, batch, args.topk))
                except Exception as e:  # report and go on
                    say(f"| {L // 1024}K | {batch} | {type(e).__name__}: {str(e).splitlines()[0][:300]} |")
                    continue
                finally:
                    torch.cuda.empty_cache()
                ways = decode_rows[-1]["ways"]
                say(decode_row(decode_rows[-1]) + f"  (select ms: "
                    f"{', '.join(f'{n}: {t:.3f}' for n, t in ways.items() if n != 'chosen')} -> {ways['chosen']}; "
                    f"radix = torch selection: {decode_rows[-1]['radix_equal']})")
    say("")
    say(f"== table ({torch.cuda.get_device_name()}, batch 1, Hq=32 Hkv=4 D=128, top-k {args.topk}, "
        f"indexer {HI}x{DI}, bf16, causal; tile sharing {sa_share()})")
    say(HEADER)
    for r in rows:
        say(row(r))
    for pattern in args.patterns:  # where DSA stops losing to dense: the basis of kernels.DENSE_CROSSOVER
        won = [r["L"] for r in rows if r["pattern"] == pattern and r["x_fwd_flash"] >= 1 and r["x_fb_flash"] >= 1
               and r["x_fwd_cudnn"] >= 1 and r["x_fb_cudnn"] >= 1]
        say(f"crossover ({pattern}): DSA no slower than flash and cuDNN, fwd and fwd+bwd, from "
            f"{min(won) // 1024 if won else '-'}K of the lengths run (kernels.DENSE_CROSSOVER = "
            f"{DENSE_CROSSOVER // 1024}K)")
    if SELECTION_ROWS:
        say("")
        say(f"== selection, indexer {HI}x{DI} + top-k {args.topk} ({torch.cuda.get_device_name()}): bf16 against "
            "float8 e4m3 index queries/keys (per-token scales)")
        say("|    L | bf16 ms | fp8 ms | speed-up | fp8 set overlap with bf16 |")
        for r in SELECTION_ROWS:
            say(f"| {r['L'] // 1024:3d}K | {r['bf16']:7.1f} | {r['fp8']:6.1f} | {r['bf16'] / r['fp8']:8.2f} "
                f"| {r['overlap']:25.4f} |")
    if decode_rows:
        say("")
        say(f"== decode step ({torch.cuda.get_device_name()}, one new token per sequence, CUDA-graph replay, "
            f"Hq=32 Hkv=4 D=128, top-k {args.topk}, bf16; SDPA = fastest of flash / cuDNN / efficient)")
        say(DECODE_HEADER)
        for r in decode_rows:
            say(decode_row(r))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_dsa_log.txt").write_text("\n".join(LOG) + "\n")
        (args.out / "bench_dsa.json").write_text(json.dumps({"prefill": rows, "decode": decode_rows,
                                                             "selection": SELECTION_ROWS}, indent=1))


if __name__ == "__main__":
    main()
