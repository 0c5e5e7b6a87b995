"""Dense causal attention of the student's shape through each SDPA backend: native GQA (`enable_gqa=True` on the
K/V heads, what transformers passes) against K/V expanded to every query head, in transformers' layout
(`[B, L, H, D]` projections transposed to `[B, H, L, D]`) and contiguous. Forward and forward+backward, median
CUDA-event ms and TFLOP/s of causal attention (forward 2 L^2 H D; backward counted as 2.5x the forward).

    python bench/bench_attention.py                     # one GPU: L = 32768, 32 query / 4 K/V heads of 128
    python bench/bench_attention.py --length 16384

Why: at 32K tokens the policy's update spent 63% of its GPU time in cuDNN attention at ~150 TFLOP/s
(bench_train_step.py --profile), where bench_dsa.py measured the same kernels at ~577 TFLOP/s with expanded K/V.
Answer (H100, bench/README.md): native GQA and expanded K/V run alike (~560 TFLOP/s fwd+bwd through cuDNN); the
slow calls were given a dense `[L, L]` causal mask instead of `is_causal`. Hence `models/attention.py`.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench_logprobs import time_ms  # CUDA-event median ms (bench/ is on sys.path when a script there runs)


def tensor(heads: int, args, transposed: bool) -> torch.Tensor:
    shape = (1, args.length, heads, args.head_dim) if transposed else (1, heads, args.length, args.head_dim)
    t = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    return (t.transpose(1, 2) if transposed else t).requires_grad_()


def measure(backend: str, native: bool, transposed: bool, args) -> tuple:
    """One row: (backend, native, transposed, fwd ms, fwd TFLOP/s, fwd+bwd ms, fwd+bwd TFLOP/s)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    flops = 2 * args.length**2 * args.heads * args.head_dim  # causal forward
    q = tensor(args.heads, args, transposed)
    kv_heads = args.kv_heads if native else args.heads
    k, v = tensor(kv_heads, args, transposed), tensor(kv_heads, args, transposed)
    grad = torch.randn(1, args.heads, args.length, args.head_dim, device="cuda", dtype=torch.bfloat16)

    def forward():
        with sdpa_kernel(getattr(SDPBackend, backend)):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=native)

    try:
        fwd = time_ms(forward, torch.device("cuda"), 2, args.reps)
        both = time_ms(lambda: forward().backward(grad), torch.device("cuda"), 2, args.reps)
    except RuntimeError as err:
        return backend, native, transposed, "failed: " + str(err).splitlines()[0][:60], "", "", ""
    return (backend, native, transposed, f"{fwd:.1f}", f"{flops / fwd / 1e9:.0f}", f"{both:.1f}",
            f"{3.5 * flops / both / 1e9:.0f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    rows = []
    for backend in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"):
        for native in (True, False):
            for transposed in (True, False):
                rows.append(measure(backend, native, transposed, args))
                print(*rows[-1], flush=True)
                torch.cuda.empty_cache()
    print(f"\ndevice: {torch.cuda.get_device_name()}; L={args.length}, {args.heads}/{args.kv_heads} heads of "
          f"{args.head_dim}, bf16, causal\n")
    print("| backend | native GQA | transposed layout | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")


if __name__ == "__main__":
    main()
