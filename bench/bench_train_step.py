"""Training-step benchmark: the policy worker (FSDP2 bf16 mixed precision, activation checkpointing, log-probs from
hidden states) beside a plain reference step, on a student of Qwen3-30B-A3B's exact layer shape.

    python bench/bench_train_step.py                      # one GPU: 4 layers, 4K / 16K / 32K tokens per sequence
    python bench/bench_train_step.py --small              # CPU smoke run at toy size

Student: `--layers` decoder layers of hidden 2048, 32 query / 4 KV heads of 128, 128 experts (8 active) of
moe_intermediate 768, vocab 151,936; random init, fp32 master weights. One sequence per step: a 16-token prompt and
a response filling the rest, so every token after the prompt is scored.

Rows, in one run:
- reference: transformers forward (autocast bf16 over fp32 weights), full-vocabulary fp32 log-softmax at the
  response positions, masked mean, backward, AdamW step;
- ours, update: `PolicyWorker.update` (one optimizer update) on the same sequence;
- ours, whole step: pi_old pass + update + weight buckets streamed to the CPU (what a sync sends).

MFU = model FLOPs of forward + backward (6 x active parameters per token, lm_head on scored tokens, plus causal
attention 6 * L^2 * heads * head_dim per layer) over the time x the device's dense bf16 peak (`--peak`, 790
TFLOP/s measured on the H200 here).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import fused_rms_norm  # noqa: E402


def word_tokenizer(vocab: int, folder: Path):
    """A tokenizer of `vocab` entries (token ids are all the benchmark needs), saved to `folder`."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab - 2)}
    words.update({"<pad>": vocab - 2, "<eos>": vocab - 1})
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="<pad>")),
                                  pad_token="<pad>", eos_token="<eos>")
    tok.save_pretrained(str(folder))
    return tok


def job_config(args, tokenizer_dir: Path):
    from rl.config import JobConfig, TrainerConfig

    cfg = JobConfig()
    cfg.model.path = None
    cfg.model.tokenizer = str(tokenizer_dir)
    t = cfg.model.tiny
    t.family, t.hidden_size, t.num_layers = "qwen3_moe", args.hidden, args.layers
    t.num_heads, t.num_kv_heads, t.head_dim = args.heads, args.kv_heads, args.head_dim
    t.intermediate_size, t.moe_intermediate_size = args.moe_intermediate * 8, args.moe_intermediate
    t.num_experts, t.experts_per_token = args.experts, args.active
    cfg.teachers = []
    cfg.algorithm.advantage, cfg.algorithm.policy_loss, cfg.algorithm.mismatch = "grpo", "gspo", "none"
    cfg.optim.lr, cfg.optim.grad_clip = 1e-5, 1.0
    cfg.trainer = TrainerConfig(micro_batch_size=1, activation_checkpointing=args.checkpointing[0])
    return cfg


def sequence(vocab: int, length: int, device):
    """A one-sequence Rollouts: 16 prompt tokens, a response filling the rest, advantages of a GSPO step."""
    from models.chat import RenderedPrompt
    from rl.rollouts import Rollouts
    from tasks.base import Sample

    g = torch.Generator().manual_seed(length)
    prompt = torch.randint(0, vocab - 2, (16,), generator=g).tolist()
    t_len = length - 16
    ids = torch.randint(0, vocab - 2, (1, t_len), generator=g)
    mask = torch.ones(1, t_len)
    r = Rollouts(samples=[Sample(id="s", domain="d", messages=[], reference=None)],
                 prompts=[RenderedPrompt(prompt, [0] * 16)], group_ids=torch.zeros(1, dtype=torch.long),
                 response_ids=ids, response_mask=mask, sampler_logprobs=torch.zeros(1, t_len),
                 truncated=torch.zeros(1, dtype=torch.bool), completions=[""])
    r.old_logprobs = torch.full((1, t_len), -12.0)
    r.advantages = torch.ones(1, t_len)
    r.loss_mask = mask
    return r


def model_flops(args, length: int, scored: int) -> float:
    h, d = args.hidden, args.head_dim
    attn = h * args.heads * d * 2 + h * args.kv_heads * d * 2
    moe = args.active * 3 * h * args.moe_intermediate + h * args.experts
    dense = 6 * args.layers * (attn + moe) * length + 6 * h * args.vocab * scored
    attention = 6 * args.layers * length * length * args.heads * d / 2 * 2  # causal: half of 2 * 2 L^2 h d, x3
    return dense + attention


def timed(fn, device, repeats: int) -> tuple[float, float]:
    """(median seconds, peak GiB) of `fn()` after one warm-up."""
    fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return sorted(times)[len(times) // 2], peak


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reference_step(args, cfg, tokenizer, device, rollouts):
    """Plain transformers: forward with full logits at the response positions, fp32 log-softmax, backward, AdamW."""
    from models.batching import pack
    from models.checkpointing import checkpointing_mode, enable_checkpointing
    from rl.student import build_student

    model, _ = build_student(cfg, tokenizer, device=device)
    model.train()
    enable_checkpointing(model, checkpointing_mode(args.checkpointing[0], device))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                            fused=device.type == "cuda" or None)
    batch = pack(rollouts.prompts, rollouts.unpadded_responses(), tokenizer.pad_token_id).to(device)
    ids = rollouts.response_ids.to(device)
    p_len, t_len = batch.prompt_len, ids.shape[1]
    keep = torch.arange(p_len - 1, p_len + t_len - 1, device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(**batch.model_inputs(), use_cache=False, logits_to_keep=keep).logits
        logp = torch.log_softmax(logits.float(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        loss = -logp.mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, device, args.repeats)


def policy_steps(args, cfg, device, rollouts) -> tuple[tuple[float, float], tuple[float, float]]:
    """(update only, whole step) as (median seconds, peak GiB) through `PolicyWorker`."""
    from rl.policy import PolicyWorker

    worker = PolicyWorker(cfg)
    step = [0]

    def update():
        worker.update(rollouts, step[0])
        step[0] += 1

    def whole():
        worker.logprobs(rollouts)
        update()
        for _ in worker.weight_buckets(512):
            pass

    results = timed(update, device, args.repeats), timed(whole, device, args.repeats)
    if args.profile and device.type == "cuda":
        profile_update(update, args.profile)
    return results


def profile_update(update, path: str) -> None:
    """One update under torch.profiler: the kernels that take the GPU time, written to `path`, first lines printed."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        update()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)
    by_source = prof.key_averages(group_by_stack_n=8).table(sort_by="self_cuda_time_total", row_limit=25)
    with open(path, "a") as f:
        f.write(table + "\n" + by_source + "\n")
    print("\n".join(table.splitlines()[:25]), flush=True)


def free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def report(row, args, device) -> None:
    """One row as soon as it is measured (a run cut short still leaves what it measured)."""
    length, label, t, peak, flops = row
    print(f"  {length} tokens, {label}: {t:.3f} s, {length / t:,.0f} tokens/s, peak {peak:.2f} GiB", flush=True)


def variant_tag(args, **values: str) -> str:
    """' [checkpointing=selective]': the options given several values, as this row ran them ('' for none)."""
    varied = [f"{key}={value}" for key, value in values.items() if len(getattr(args, key)) > 1]
    return f" [{', '.join(varied)}]" if varied else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="CPU-sized smoke run")
    parser.add_argument("--lengths", type=int, nargs="*", default=None)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak", type=float, default=790e12, help="dense bf16 FLOP/s of the device")
    parser.add_argument("--checkpointing", nargs="+", default=["auto"], choices=["auto", "on", "selective", "off"],
                        help="trainer.activation_checkpointing values (one pair of rows each; the reference takes "
                             "the first)")
    parser.add_argument("--fused-norms", nargs="+", default=["on"], choices=["on", "off"],
                        help="the student's RMSNorms as Triton kernels (models/fused_rms_norm.py) or transformers' "
                             "ops (one pair of rows each)")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--attention", nargs="+", default=["auto"],
                        help="model.attention values to run the policy rows with (one pair of rows each)")
    parser.add_argument("--profile", default="", help="append a profiler table of one update per length to this file")
    args = parser.parse_args()
    shape = dict(hidden=2048, heads=32, kv_heads=4, head_dim=128, experts=128, active=8, moe_intermediate=768,
                 vocab=151936)
    if args.small:
        shape = dict(hidden=64, heads=4, kv_heads=2, head_dim=16, experts=8, active=2, moe_intermediate=32, vocab=512)
        args.lengths = args.lengths or [128, 256]
    for k, v in shape.items():
        setattr(args, k, v)
    args.lengths = args.lengths or [4096, 16384, 32768]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = word_tokenizer(args.vocab, Path(tmp))
        cfg = job_config(args, Path(tmp))
        for length in args.lengths:
            rollouts = sequence(args.vocab, length, device)
            flops = model_flops(args, length, length - 16)
            if not args.skip_reference:
                try:
                    t, peak = reference_step(args, cfg, tokenizer, device, rollouts)
                except torch.OutOfMemoryError:
                    t, peak = float("nan"), float("nan")
                rows.append((length, "reference (HF + full log-softmax)", t, peak, flops))
                report(rows[-1], args, device)
                free(device)
            for attention, checkpointing, fused in itertools.product(args.attention, args.checkpointing,
                                                                   args.fused_norms):
                cfg.model.attention, cfg.trainer.activation_checkpointing = attention, checkpointing
                fused_rms_norm.USE_TRITON = None if fused == "on" else False
                tag = variant_tag(args, attention=attention, checkpointing=checkpointing, fused_norms=fused)
                (t, peak), (t_all, peak_all) = policy_steps(args, cfg, device, rollouts)
                rows.append((length, f"ours{tag}: update", t, peak, flops))
                rows.append((length, f"ours{tag}: pi_old + update + weight sync", t_all, peak_all, flops * 4 / 3))
                for row in rows[-2:]:
                    report(row, args, device)
                free(device)
    print(f"\ndevice: {name}; student: {args.layers} layers of hidden {args.hidden}, {args.heads}/{args.kv_heads} "
          f"heads of {args.head_dim}, {args.experts} experts ({args.active} active) x {args.moe_intermediate}, vocab "
          f"{args.vocab}; bf16 mixed precision over fp32 master weights on CUDA")
    print("\n| tokens | path | step s | tokens/s | MFU | peak GiB |\n| --- | --- | --- | --- | --- | --- |")
    for length, label, t, peak, flops in rows:
        mfu = flops / t / args.peak if device.type == "cuda" else float("nan")
        print(f"| {length} | {label} | {t:.3f} | {length / t:,.0f} | {mfu:.1%} | {peak:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
