"""DSA kernels on one GPU: correctness against the float64 PyTorch reference, then timings against dense SDPA.

Shape: the Qwen3-30B-A3B attention (32 query heads, 4 KV heads, head dim 128), batch 1, causal, bf16, top-k 2048,
indexer of 4 heads x 64. Prints a correctness block, then one table row per length (times in ms, median of
CUDA-event timings), then the table again at the end. `--out DIR` also writes the log and a JSON there.

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
from models.dsa.kernels.triton_indexer import STATS as INDEXER_STATS  # noqa: E402
from models.dsa.kernels.triton_indexer import index_scores, indexer_topk  # noqa: E402
from models.dsa.kernels.triton_sparse_attention import sparse_attention, sparse_attention_fwd  # noqa: E402
from models.dsa.reference import sparse_attention_ref  # noqa: E402
from timing import peak_gib, time_ms  # noqa: E402

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


def bench_length(L: int, topk: int) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    reps = 3 if L >= 65536 else 5
    q, k, v, qi, ki, wi = inputs(L, L, torch.bfloat16, 1234 + L)
    scale = 1 / math.sqrt(D)
    res: dict = {"L": L}

    g = HQ // HKV
    ke, ve = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)  # expanded outside the timed region

    def sdpa(backend, a, b_, c, gqa):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(a, b_, c, is_causal=True, enable_gqa=gqa)

    gd = torch.randn_like(q)
    variants = {"flash": (SDPBackend.FLASH_ATTENTION, k, v, True),
                "flash_x": (SDPBackend.FLASH_ATTENTION, ke, ve, False),
                "cudnn_x": (SDPBackend.CUDNN_ATTENTION, ke, ve, False)}
    for name, (backend, kk_, vv_, gqa) in variants.items():
        if name == "flash" and not GQA_NATIVE:
            continue
        qd, kd, vd = (x.detach().clone().requires_grad_() for x in (q, kk_, vv_))

        def fb(backend=backend, qd=qd, kd=kd, vd=vd, gqa=gqa):
            o = sdpa(backend, qd, kd, vd, gqa)
            o.backward(gd)
            qd.grad = kd.grad = vd.grad = None

        try:
            res[f"{name}_fwd"] = timeit(lambda b_=backend, k_=kk_, v_=vv_, g_=gqa: sdpa(b_, q, k_, v_, g_), reps)
            res[f"{name}_fb"] = timeit(fb, reps)
            if name == "flash":
                res["dense_mem"] = peak(fb)
        except RuntimeError as e:
            say(f"  dense {name} unavailable: {str(e).splitlines()[0][:100]}")
    del ke, ve
    res["dense_fwd"] = res.get("flash_fwd", res.get("flash_x_fwd"))
    res["dense_fb"] = res.get("flash_fb", res.get("flash_x_fb"))
    res.setdefault("dense_mem", float("nan"))

    def scores_only():
        lk = L
        chunk = max(64, ((1 << 29) // lk) // 64 * 64)
        n_full = min(L, topk)
        buf = torch.empty(min(chunk, L - n_full) * lk, dtype=torch.bfloat16, device="cuda")
        for start in range(n_full, L, chunk):
            rows = min(chunk, L - start)
            nk = min(lk, start + rows)
            index_scores(qi, ki, wi, start, rows, nk, 0, buf[: rows * nk].view(1, rows, nk))

    res["indexer"] = timeit(scores_only, reps)
    import models.dsa.kernels.triton_indexer as ti

    finals = {}
    for final in ("radix", "torch"):  # how each candidate list is cut to k; the faster becomes the default
        ti.FINAL_SELECT = final
        finals[final] = timeit(lambda: indexer_topk(qi, ki, wi, topk), reps)
    ti.FINAL_SELECT = min(finals, key=finals.get)
    res["final_select"] = dict(finals, chosen=ti.FINAL_SELECT)
    appends = {}
    for mode in ("atomic", "scan", "loop"):  # how the fused pass appends candidates
        ti.SELECT_APPEND = mode
        appends[mode] = timeit(lambda: indexer_topk(qi, ki, wi, topk), reps)
    ti.SELECT_APPEND = min(appends, key=appends.get)
    res["append"] = dict(appends, chosen=ti.SELECT_APPEND)
    INDEXER_STATS["profile"] = True
    indexer_topk(qi, ki, wi, topk)
    INDEXER_STATS["profile"] = False
    res["stages"] = dict(INDEXER_STATS["stage_ms"])
    res["indexer_topk"] = timeit(lambda: indexer_topk(qi, ki, wi, topk), reps)  # streaming selection
    res["fallback_rows"] = INDEXER_STATS["fallback_rows"]
    res["topk"] = res["indexer_topk"] - res["indexer"]
    res["chunked_radix"] = timeit(lambda: indexer_topk(qi, ki, wi, topk, method="chunked"), reps)
    res["chunked_torch"] = timeit(
        lambda: indexer_topk(qi, ki, wi, topk, method="chunked", score_dtype=torch.float32), reps)
    idx = indexer_topk(qi, ki, wi, topk)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    res["sparse_fwd"] = timeit(lambda: sparse_attention_fwd(qt, kt, vt, idx, scale, 0), reps)
    # best-case locality for comparison: each query takes its `topk` most recent keys (a sliding window)
    t = torch.arange(L, device="cuda", dtype=torch.int32)[:, None]
    win = (t - torch.arange(topk, device="cuda", dtype=torch.int32)[None, :])
    win = torch.where(win >= 0, win, -1)[None].contiguous()
    res["sparse_fwd_window"] = timeit(lambda: sparse_attention_fwd(qt, kt, vt, win, scale, 0), reps)
    qs, ks, vs = (x.detach().clone().requires_grad_() for x in (q, k, v))

    def sparse_fb():
        o = sparse_attention(qs, ks, vs, idx, scale, causal_offset=0)
        o.backward(gs)
        qs.grad = ks.grad = vs.grad = None

    gs = torch.randn(1, L, HQ, D, device="cuda", dtype=torch.bfloat16)
    res["sparse_fb"] = timeit(sparse_fb, reps)

    def dsa_fwd():
        ix = indexer_topk(qi, ki, wi, topk)
        return sparse_attention_fwd(qt, kt, vt, ix, scale, 0)

    def dsa_fb():
        ix = indexer_topk(qi, ki, wi, topk)
        o = sparse_attention(qs, ks, vs, ix, scale, causal_offset=0)
        o.backward(gs)
        qs.grad = ks.grad = vs.grad = None

    res["dsa_fwd"] = timeit(dsa_fwd, reps)
    res["dsa_fb"] = timeit(dsa_fb, reps)
    res["dsa_mem"] = peak(dsa_fb)
    res["ratio_fwd"] = res["dense_fwd"] / res["dsa_fwd"]
    res["ratio_fb"] = res["dense_fb"] / res["dsa_fb"]
    best_f = min(res.get(f"{n}_fwd", float("inf")) for n in ("flash", "flash_x", "cudnn_x"))
    best_b = min(res.get(f"{n}_fb", float("inf")) for n in ("flash", "flash_x", "cudnn_x"))
    res["ratio_fwd_best"] = best_f / res["dsa_fwd"]
    res["ratio_fb_best"] = best_b / res["dsa_fb"]
    return res


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


HEADER = ("|    L | flash fwd | flash f+b | cuDNN fwd | cuDNN f+b | indexer | top-k | (chunked radix) | (chunked torch) "
          "| sparse fwd "
          "| (window) | sparse f+b | DSA fwd | DSA f+b | fwd x | f+b x | fwd x best | f+b x best | mem dense GiB "
          "| mem DSA GiB |")


def row(r: dict) -> str:
    nan = float("nan")
    return (f"| {r['L'] // 1024:3d}K | {r['dense_fwd']:9.1f} | {r['dense_fb']:9.1f} | {r.get('cudnn_x_fwd', nan):9.1f} "
            f"| {r.get('cudnn_x_fb', nan):9.1f} | {r['indexer']:7.1f} | {r['topk']:5.1f} | "
            f"{r['chunked_radix']:15.1f} | {r['chunked_torch']:15.1f} | {r['sparse_fwd']:10.1f} | "
            f"{r['sparse_fwd_window']:8.1f} | {r['sparse_fb']:10.1f} | {r['dsa_fwd']:7.1f} | {r['dsa_fb']:7.1f} | "
            f"{r['ratio_fwd']:5.2f} | {r['ratio_fb']:5.2f} | {r['ratio_fwd_best']:10.2f} | {r['ratio_fb_best']:10.2f} "
            f"| {r['dense_mem']:13.2f} | {r['dsa_mem']:11.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    ap.add_argument("--topk", type=int, default=2048)
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--sweep-length", type=int, default=0,
                    help="time launch settings of the fused indexer select and the sparse kernels at this "
                         "length first (the fastest become the defaults for the table; 0 = keep the defaults)")
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
    if args.sweep_length:
        sweep_indexer(args.sweep_length, args.topk)
        sweep(args.sweep_length, args.topk)
        torch.cuda.empty_cache()
    rows = []
    say("times in ms (median of CUDA-event timings); x = flash / DSA, x best = fastest dense (flash or cuDNN) / DSA;"
        " DSA = indexer + top-k (streaming) + sparse attention; indexer = score pass alone, top-k = the rest;"
        " (chunked ...) = indexer + top-k by the chunked path")
    say(HEADER)
    for L in args.lengths:
        t0 = time.time()
        try:
            r = bench_length(L, args.topk)
        except torch.cuda.OutOfMemoryError as e:  # report and go on to the table
            say(f"| {L // 1024}K | OOM: {str(e).splitlines()[0]} |")
            continue
        rows.append(r)
        stages = " ".join(f"{k}={v:.1f}" for k, v in r["stages"].items())
        fin = r["final_select"]
        say(row(r) + f"  ({time.time() - t0:.0f}s, stream fallback rows {r['fallback_rows']}; stages ms: {stages};"
            f" final radix {fin['radix']:.1f} / torch {fin['torch']:.1f} -> {fin['chosen']};"
            f" append atomic {r['append']['atomic']:.1f} / scan {r['append']['scan']:.1f}"
            f" / loop {r['append']['loop']:.1f}"
            f" -> {r['append']['chosen']})")
        torch.cuda.empty_cache()
    say("")
    say(f"== table ({torch.cuda.get_device_name()}, batch 1, Hq=32 Hkv=4 D=128, top-k {args.topk}, "
        f"indexer {HI}x{DI}, bf16, causal)")
    say(HEADER)
    for r in rows:
        say(row(r))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_dsa_log.txt").write_text("\n".join(LOG) + "\n")
        (args.out / "bench_dsa.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
