"""MoE experts benchmark: one Qwen3-MoE sparse block (router + experts) forward and forward+backward, transformers'
`grouped_mm` experts beside ours (`grouped_mm_permute`, `models/moe_experts.py`) with torch-op gathers and with
the Triton gathers, in one run.

    python bench/bench_moe_experts.py            # CUDA: Qwen3-30B-A3B's block at 4K / 16K / 32K tokens
    python bench/bench_moe_experts.py --small    # CPU smoke run at toy size

Block: hidden 2048, 128 experts of moe_intermediate 768, 8 active, bf16 weights and activations (`--small`: hidden
64, 8 experts of 32, 2 active, float32). The rows differ only in how tokens reach the experts and come back (the
gathers, routing-weight multiply and k-sum); the grouped GEMMs are the same. Grouped-GEMM FLOPs
(6 x tokens x k x 3 x hidden x moe_intermediate for forward+backward) give the TFLOP/s column.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import peak_gib, time_ms  # noqa: E402


def block(args, device, dtype):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = Qwen3MoeConfig(hidden_size=args.hidden, moe_intermediate_size=args.moe_intermediate,
                         num_experts=args.experts, num_experts_per_tok=args.active, norm_topk_prob=True)
    torch.manual_seed(0)
    module = Qwen3MoeSparseMoeBlock(cfg).to(device=device, dtype=dtype)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return module, cfg


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="CPU-sized smoke run")
    parser.add_argument("--tokens", type=int, nargs="*", default=None)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    shape = dict(hidden=2048, experts=128, active=8, moe_intermediate=768)
    if args.small:
        shape = dict(hidden=64, experts=8, active=2, moe_intermediate=32)
    for k, v in shape.items():
        setattr(args, k, v)
    args.tokens = args.tokens or ([256, 1024] if args.small else [4096, 16384, 32768])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"

    import models.moe_experts as moe

    moe.register()
    module, cfg = block(args, device, dtype)
    variants = [("transformers grouped_mm", "grouped_mm", None), ("ours, torch gathers", "grouped_mm_permute", False)]
    if device.type == "cuda":
        variants.append(("ours, Triton gathers", "grouped_mm_permute", None))
    rows = []
    for n in args.tokens:
        x = torch.randn(1, n, args.hidden, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(1, n, args.hidden, device=device, dtype=dtype)
        flops = 6 * n * args.active * 3 * args.hidden * args.moe_intermediate
        ref = None
        for label, impl, use_triton in variants:
            cfg._experts_implementation, moe.USE_TRITON = impl, use_triton

            def forward(x=x):
                with torch.no_grad():
                    return module(x)

            def forward_backward(x=x, grad=grad):
                module.zero_grad(set_to_none=True)
                x.grad = None
                module(x).backward(grad)

            out = forward()
            forward_backward()
            if ref is None:
                ref = (out, x.grad.clone())
            err = max((out.float() - ref[0].float()).abs().max().item(),
                      (x.grad.float() - ref[1].float()).abs().max().item())
            f_ms = time_ms(forward, device, 1, args.repeats)
            fb_ms = time_ms(forward_backward, device, 1, args.repeats)
            peak = peak_gib(forward_backward, device)
            rows.append((n, label, f_ms, fb_ms, flops / fb_ms / 1e9, peak, err))
            print(f"  {n} tokens, {label}: fwd {f_ms:.2f} ms, fwd+bwd {fb_ms:.2f} ms", flush=True)
    moe.USE_TRITON = None
    print(f"\nMoE block (router + experts), {name}, {dtype}, hidden {args.hidden}, {args.experts} experts of "
          f"{args.moe_intermediate}, {args.active} active, median of {args.repeats}")
    print("| tokens | experts path | fwd ms | fwd+bwd ms | grouped-GEMM TFLOP/s | peak GiB above the inputs (fwd+bwd) | max abs diff |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for n, label, f_ms, fb_ms, tflops, peak, err in rows:
        peak_text = "n/a" if peak is None else f"{peak:.2f}"
        print(f"| {n} | {label} | {f_ms:.2f} | {fb_ms:.2f} | {tflops:.0f} | {peak_text} | {err:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
