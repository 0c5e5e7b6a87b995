"""Log-probs from hidden states (`models.logprobs.hidden_logprobs`) against full `[N, V]` logits: fwd+bwd time,
peak memory and error, on one GPU (or a small CPU check).

bf16 hidden `[N, H]` and weight `[V, H]`, both requiring grad; ids `[N, k]`: k = 1 (the sampled token) and
k = 17 (sampled + 16 teacher ids). A random upstream gradient goes on the log-probs; the entropy is computed and
logged, with no gradient. Rows:
- matmul floor: the three bf16 matmuls alone: logits = h @ W.T, grad_h = G @ W, grad_W = G.T @ h;
- naive: full bf16 logits, fp32 log_softmax, gather (entropy from the same log_softmax, no grad);
- token_logprobs: today's `models.batching.token_logprobs` on full bf16 logits;
- ours (eager) / ours (compiled): `hidden_logprobs`, with the per-tile bodies eager / through torch.compile.
Columns: fwd+bwd ms (median of CUDA-event timings), ratio to the floor, peak memory above the inputs (GiB,
`max_memory_allocated` after `reset_peak_memory_stats`; includes the returned grad_h and grad_W), and the max abs
error of the log-probs against the fp32 path (fp32 matmul, fp32 log_softmax).

    python bench/bench_logprobs.py             # one H200: N=32768, H=2048, V=151936
    python bench/bench_logprobs.py --small     # CPU check: N=512, H=256, V=4096
    python bench/bench_logprobs.py --tile-mib 64 --rows "matmul floor" "ours (compiled)"   # try another tile
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import logprobs as logprobs_mod  # noqa: E402
from models.batching import token_logprobs  # noqa: E402
from models.logprobs import hidden_logprobs, tile_shape  # noqa: E402
from timing import peak_gib, time_ms  # noqa: E402


def say(msg: str = "") -> None:
    print(msg, flush=True)


def reference_logprobs(h: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """The fp32 path, in row chunks (the values of one full fp32 log_softmax)."""
    out = []
    with torch.no_grad():
        wf = w.float()
        for r0 in range(0, h.shape[0], 2048):
            logp = torch.log_softmax(h[r0 : r0 + 2048].float() @ wf.T / temperature, -1)
            out.append(logp.gather(1, ids[r0 : r0 + 2048]))
    return torch.cat(out)


def steps(h, w, ids, g, temperature: float, tile, compiled_row: bool) -> dict[str, Callable]:
    """name -> make(): a fwd+bwd step returning the log-probs `[N, k]` (None for the floor). make() allocates what
    the row needs beyond the shared inputs (the floor's upstream logits gradient G)."""
    n, k = ids.shape
    rows, cols = tile

    def floor():
        big = torch.randn(n, w.shape[0], device=h.device, dtype=h.dtype)

        def step():
            with torch.no_grad():
                h @ w.T
                big @ w
                big.T @ h
        return step

    def naive():
        logits = h @ w.T
        logp = torch.log_softmax(logits.float() / temperature, -1)
        picked = logp.gather(1, ids)
        with torch.no_grad():
            (-(logp.exp() * logp).sum(-1)).mean()
        torch.autograd.grad(picked, [h, w], g)
        return picked.detach()

    def today():
        logits = (h @ w.T).unsqueeze(0)
        tokens = ids.unsqueeze(0) if k > 1 else ids[:, 0].unsqueeze(0)
        picked, _entropy = token_logprobs(logits, tokens, temperature, return_entropy=True)
        picked = picked.reshape(n, k)
        torch.autograd.grad(picked, [h, w], g)
        return picked.detach()

    def ours(compiled: bool):
        def step():
            out = hidden_logprobs(h, w, ids, temperature=temperature, chunk_rows=rows, chunk_vocab=cols,
                                  compiled=compiled)
            torch.autograd.grad(out.logprobs, [h, w], g)
            return out.logprobs.detach()
        return step

    made = {"matmul floor": floor, "naive": lambda: naive, "token_logprobs": lambda: today,
            "ours (eager)": lambda: ours(False)}
    if compiled_row:
        made["ours (compiled)"] = lambda: ours(True)
    return made


def forward_ms(h, w, ids, temperature, tile, compiled, device, warmup, reps) -> float:
    """Our forward alone (autograd state kept, as in training)."""
    return time_ms(lambda: hidden_logprobs(h, w, ids, temperature=temperature, chunk_rows=tile[0],
                                           chunk_vocab=tile[1], compiled=compiled), device, warmup, reps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="N=512, H=256, V=4096 (a CPU check)")
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--k", type=int, nargs="+", default=[1, 17])
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--chunk-rows", type=int, default=None)
    ap.add_argument("--chunk-vocab", type=int, default=None)
    ap.add_argument("--tile-mib", type=int, default=None, help="models.logprobs.TILE_BYTES in MiB")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                    help="the 'ours (compiled)' row: auto = on CUDA")
    ap.add_argument("--rows", nargs="+", default=None, help="only these rows (names as in the table)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (for a shared CPU)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.small:
        args.n, args.hidden, args.vocab = 512, 256, 4096
    if args.tile_mib:
        logprobs_mod.TILE_BYTES = args.tile_mib << 20
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    compiled_row = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    n, width, v = args.n, args.hidden, args.vocab
    tile = tile_shape(n, v, args.chunk_rows, args.chunk_vocab)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    say(f"device: {name}; torch {torch.__version__}")
    say(f"N={n} H={width} V={v} {args.dtype}, T={args.temperature}; tile {tile[0]} x {tile[1]}")

    gen = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(n, width, device=device, generator=gen).to(dtype).requires_grad_()
    # logits ~ N(0, 4): softmax over 151k tokens with a realistic spread of entropies
    w = (torch.randn(v, width, device=device, generator=gen) * (2.0 / width**0.5)).to(dtype).requires_grad_()

    results = []
    for k in args.k:
        ids = torch.randint(0, v, (n, k), device=device, generator=gen)
        g = torch.randn(n, k, device=device, generator=gen)
        ref = reference_logprobs(h, w, ids, args.temperature)
        floor_ms = None
        for row, make in steps(h, w, ids, g, args.temperature, tile, compiled_row).items():
            if args.rows and row not in args.rows:
                continue
            note = ""
            try:
                step = make()
                ms = time_ms(step, device, args.warmup, args.reps)
                mem = peak_gib(step, device)
                out = step()
                err = None if out is None else (out.float() - ref).abs().max().item()
                if row.startswith("ours"):
                    fwd = forward_ms(h, w, ids, args.temperature, tile, "compiled" in row, device, 1, args.reps)
                    note = f"  (forward alone {fwd:.1f} ms)"
                del step, out
            except torch.OutOfMemoryError:
                ms = mem = err = None
                row += " (OOM)"
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if row == "matmul floor":
                floor_ms = ms
            ratio = None if ms is None or floor_ms is None else ms / floor_ms
            results.append((k, row, ms, ratio, mem, err))
            say(f"k={k:<3} {row:<18} {_fmt(ms, '.1f')} ms  x{_fmt(ratio, '.2f')}  {_fmt(mem, '.2f')} GiB  "
                f"err {_fmt(err, '.2e')}{note}")
        del ids, g, ref

    say()
    say(f"device: {name}; N={n} H={width} V={v} {args.dtype}; tile {tile[0]} x {tile[1]}")
    say()
    say("| k | path | fwd+bwd ms | vs floor | peak GiB above inputs | max abs err vs fp32 |")
    say("|---:|---|---:|---:|---:|---:|")
    for k, row, ms, ratio, mem, err in results:
        say(f"| {k} | {row} | {_fmt(ms, '.1f')} | {_fmt(ratio, '.2f')}x | {_fmt(mem, '.2f')} | {_fmt(err, '.1e')} |")


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


if __name__ == "__main__":
    main()
