"""Rollout throughput (generated tokens/s) of the vLLM engine beside the transformers engine, and vLLM's weight-sync
time, on the same tiny student, prompts and sampling settings. Run it in the environment that has vLLM:

    .venv-vllm/bin/python bench/bench_rollout.py [--sizes tiny medium] [--prompts 64] [--new-tokens 64] [--threads 2]

Sizes: `tiny` is the demo's student (Qwen3-VL-MoE, 2 layers, hidden 128, 4 experts); `medium` is 8 layers,
hidden 512, 8 experts. Prompts are the embedded suite's text questions; sampling at temperature 1, top-p 1,
`max_new_tokens` fixed, end-of-turn allowed (tokens counted as generated, not as asked for). Each engine is timed
after a 4-token warm-up call on the same prompts. Weight sync: the median of 5 `load_weights` of a fresh state dict.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from rollout.base import SamplingSettings

SIZES = {
    "tiny": dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=256,
                 moe_intermediate_size=128, num_experts=4, experts_per_token=2),
    "medium": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64, intermediate_size=1024,
                   moe_intermediate_size=256, num_experts=8, experts_per_token=2),
}
QUESTIONS = ["What is 17 + 25?", "Is 41 larger than 39?", "Name the value of key apple.", "What is 6 * 7?",
             "Which is smaller, 12 or 21?", "What is 100 - 37?", "Count to five.", "What colour is the sky?"]


def timed(engine, prompts, settings) -> tuple[float, int]:
    # Warm-up on the same batch (vLLM compiles its log-prob rank kernel on first use, per shape regime).
    engine.generate(prompts, SamplingSettings(**{**vars(settings), "max_new_tokens": 4}))
    t0 = time.perf_counter()
    gens = engine.generate(prompts, settings)
    seconds = time.perf_counter() - t0
    return seconds, sum(len(r) for r in gens.response_ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "medium"], choices=sorted(SIZES))
    parser.add_argument("--prompts", type=int, nargs="+", default=[64])
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[64])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from models.chat import ChatRenderer
    from models.factory import TinyModelSpec, build_model, save_model, vision_layout
    from rollout.base import get_engine_class
    from rollout.hf_engine import HFEngine
    from tasks.embedded import embedded_tokenizer

    work = Path(tempfile.mkdtemp(prefix="bench_rollout_"))
    tokenizer = embedded_tokenizer(work / "data")
    rows = []
    for size in args.sizes:
        spec = TinyModelSpec(family="qwen3_vl_moe", **SIZES[size])
        model = build_model(spec, tokenizer, seed=0)
        n_params = sum(p.numel() for p in model.parameters())
        save_model(model, tokenizer, work / size)
        renderer = ChatRenderer(tokenizer, vision_layout(model))
        hf = HFEngine(model_path=str(work / size), batch_size=max(args.prompts))
        vllm = get_engine_class("vllm")(model_path=str(work / size), batch_size=max(args.prompts))
        syncs = []
        for seed in range(5):
            state = {k: v.detach() for k, v in build_model(spec, tokenizer, seed=seed + 1).state_dict().items()}
            t0 = time.perf_counter()
            vllm.load_weights(state)
            syncs.append(time.perf_counter() - t0)
            hf.load_weights(state)
        for n_prompts in args.prompts:
            prompts = [renderer.render([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])
                       for i in range(n_prompts)]
            for new_tokens in args.new_tokens:
                settings = SamplingSettings(max_new_tokens=new_tokens, temperature=1.0, top_p=1.0, seed=0,
                                            suppress_token_ids=renderer.placeholder_ids)
                hf_s, hf_tok = timed(hf, prompts, settings)
                v_s, v_tok = timed(vllm, prompts, settings)
                rows.append((size, f"{n_params / 1e6:.1f}M", n_prompts, new_tokens, hf_tok / hf_s, v_tok / v_s,
                             statistics.median(syncs) * 1000))
                print(f"  {size} {n_prompts}x{new_tokens}: transformers {hf_tok / hf_s:,.0f} tok/s, "
                      f"vLLM {v_tok / v_s:,.0f} tok/s", flush=True)
        del vllm, hf

    print(f"\nrollout throughput, sampling at temperature 1 ({args.threads} CPU threads, torch "
          f"{torch.__version__}, CPU shared with other jobs)")
    print("| model | params | prompts | max new tokens | transformers tok/s | vLLM tok/s | vLLM / HF | vLLM sync ms |")
    print("|---|---|---|---|---|---|---|---|")
    for size, params, p, t, hf_tps, v_tps, sync_ms in rows:
        print(f"| {size} | {params} | {p} | {t} | {hf_tps:,.0f} | {v_tps:,.0f} | {v_tps / hf_tps:.2f} | {sync_ms:.1f} |")


if __name__ == "__main__":
    main()
