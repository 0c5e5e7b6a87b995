"""Shared-prompt packing against today's padded path on a Video-RL-shaped step: a long video prompt, G short answers.

For each shape (prompt tokens P, G answers of T tokens, `--groups` groups per step) three phases run twice in one
process, today's path ("padded": every answer with its own copy of the prompt, `--padded-micro-batch` rows per
pass) beside the packed one ("packed": each prompt once, its G answers after it, micro-batches of
`--micro-batch-tokens`):
- teacher: a teacher's scoring forward (`teachers.hf_teacher.score_padded` / `score_packed`, top-k 8);
- pi_old: the policy worker's no-grad log-prob pass (`PolicyWorker.logprobs`);
- update: the policy worker's GSPO update, forward + backward + AdamW (`PolicyWorker.update`).
The policy worker is the real one (`rl.policy`): bf16 mixed precision through FSDP2 and activation checkpointing
on CUDA, float32 on the CPU. Prompts are synthetic Qwen3-VL video prompts (frames of `--frame-tokens` video
tokens between vision_start / vision_end, random pixels for a frozen vision tower), so the vision tower runs once
per prompt copy, as it does in training. Columns: median seconds over `--reps` (after one warm-up), sequence
tokens per second (G x (P + T) x groups / s, the same work for both paths, so the ratio is the speed-up), tokens
each path actually forwards, and peak memory (CUDA: `max_memory_allocated`; CPU: peak RSS above the phase's start,
sampled every 5 ms). On CUDA the attention is FlexAttention (`--attn`): a BlockMask for the packed path.

    python bench/bench_packing.py --small        # CPU check: prompts 64/512/2048, G=8, answers 8/64, tiny model
    python bench/bench_packing.py                # one H200: prompts 4K/16K/64K, G=8, answers 64/512
    python bench/bench_packing.py --prompts 16384 --answers 64 --phases update   # one cell
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.chat import RenderedPrompt  # noqa: E402
from rl.rollouts import Rollouts  # noqa: E402

QWEN_FILES = Path(__file__).resolve().parents[2] / "shared" / "data" / "qwen_tokenizer"


def say(msg: str = "") -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------- the model and the worker


def tokenizer_folder(args, root: Path) -> str:
    """The real Qwen3 tokenizer assembled in `root` (151k vocabulary), or 'embedded' where its files are absent."""
    src = Path(args.qwen_tokenizer)
    parts = [src / "vocab.json", src / "merges.txt", src / "qwen3" / "tokenizer_config.json"]
    if args.small or not all(p.exists() for p in parts):
        return "embedded"
    folder = root / "qwen3_tokenizer"
    folder.mkdir(exist_ok=True)
    for p in parts:
        shutil.copy(p, folder / p.name)
    return str(folder)


def job_config(args, root: Path, tokenizer: str, group_size: int):
    from rl.config import load_config

    tiny = dict(family="qwen3_vl_moe", hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                num_kv_heads=args.kv_heads, head_dim=args.head_dim, intermediate_size=args.hidden * 2,
                moe_intermediate_size=args.moe_intermediate, num_experts=args.experts,
                experts_per_token=args.experts_per_token)
    cfg = {
        "run": {"name": "bench_packing", "dir": str(root / "runs"), "seed": 0},
        "model": {"path": None, "tiny": tiny, "tokenizer": tokenizer},
        "data": {"train": [{"source": "embedded", "args": {"data_dir": str(root / "data")}}], "prompts_per_step": 1},
        "rollout": {"backend": "hf", "num_workers": 0, "group_size": group_size},
        "teachers": [],
        "algorithm": {"advantage": "gspo", "policy_loss": "gspo"},
        "rewards": {"num_workers": 0},
        "optim": {"lr": 1e-6, "grad_clip": 1.0},
        "trainer": {"steps": 1, "micro_batch_size": args.padded_micro_batch,
                    "micro_batch_tokens": args.micro_batch_tokens, "threads": args.threads},
        "logging": {"progress": False, "tensorboard": False},
    }
    path = root / "bench_packing.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(path)[0]


def set_attention(model: torch.nn.Module, impl: str) -> None:
    from models.policy_head import causal_lm

    lm = causal_lm(model)
    lm.set_attn_implementation(impl)


# ---------------------------------------------------------------------- Video-RL-shaped inputs


def video_prompt(tokenizer, layout, prompt_tokens: int, frame_tokens: int, seed: int) -> RenderedPrompt:
    """A chat prompt of about `prompt_tokens` tokens: frames of `frame_tokens` video tokens (random pixels laid
    out as the vision tower reads them), then a question; exactly `prompt_tokens` after padding the text."""
    vocab = tokenizer.get_vocab()
    start, end, pad = vocab["<|vision_start|>"], vocab["<|vision_end|>"], vocab["<|video_pad|>"]
    head = tokenizer.encode("<|im_start|>user\n", add_special_tokens=False)
    tail = tokenizer.encode("When does the event happen?<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    merge = layout.merge_size
    side = int(round((frame_tokens * merge * merge) ** 0.5))  # patches per side of a frame
    per_frame = (side // merge) ** 2
    frames = max(1, (prompt_tokens - len(head) - len(tail)) // (per_frame + 2))
    ids, types = list(head), [0] * len(head)
    for _ in range(frames):
        ids += [start] + [pad] * per_frame + [end]
        types += [0] + [2] * per_frame + [0]
    filler = max(0, prompt_tokens - len(ids) - len(tail))
    word = tokenizer.encode(" frame", add_special_tokens=False)[0]
    ids += [word] * filler + tail
    types += [0] * (filler + len(tail))
    gen = torch.Generator().manual_seed(seed)
    dim = 3 * layout.temporal_patch_size * layout.patch_size * layout.patch_size
    pixels = torch.randn(frames * side * side, dim, generator=gen)
    grid = torch.tensor([[1, side, side]] * frames)
    return RenderedPrompt(ids, types, pixels, grid)


def step_rollouts(prompts: list[RenderedPrompt], group: int, answer: int, plain: torch.Tensor, seed: int) -> Rollouts:
    """G answers of exactly `answer` tokens per prompt, with pi_old = 0 and group-normalised advantages. `plain`:
    the ids answers draw from (no special token: a vision placeholder in an answer would be a video token)."""
    from tasks.base import Sample

    gen = torch.Generator().manual_seed(seed)
    b = len(prompts) * group
    ids = plain[torch.randint(0, len(plain), (b, answer), generator=gen)]
    mask = torch.ones(b, answer)
    samples = [Sample(id=f"p{i}", domain="video", messages=[], reference=None) for i in range(len(prompts))]
    out = Rollouts(samples=[s for s in samples for _ in range(group)], prompts=[p for p in prompts for _ in range(group)],
                   group_ids=torch.arange(len(prompts)).repeat_interleave(group), response_ids=ids,
                   response_mask=mask, sampler_logprobs=torch.zeros(b, answer),
                   truncated=torch.zeros(b, dtype=torch.bool), completions=[""] * b)
    adv = torch.randn(b, generator=gen)
    out.advantages = (adv - adv.mean())[:, None] * mask
    out.old_logprobs = torch.zeros(b, answer)
    out.loss_mask = mask.clone()
    return out


# ---------------------------------------------------------------------- measuring


class PeakMemory:
    """Peak memory of a phase in GiB: CUDA's allocator peak, or the process's RSS high-water above its start."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self._rss()
            self.peak = self.base
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())
        self.gib = (self.peak - self.base) / 2**30


def measure(fn, device: torch.device, reps: int) -> tuple[float, float]:
    """(median seconds over `reps` after one warm-up call, peak GiB of the slowest-memory call)."""
    fn()
    times, peaks = [], []
    for _ in range(reps):
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        peaks.append(mem.gib)
    return statistics.median(times), max(peaks)


def forwarded_tokens(rollouts: Rollouts, packed: bool) -> int:
    n = rollouts.response_mask.sum(-1).long().tolist()
    if not packed:
        return sum(len(p.input_ids) + t for p, t in zip(rollouts.prompts, n))
    seen = {}
    for g, p in zip(rollouts.group_ids.tolist(), rollouts.prompts):
        seen[g] = len(p.input_ids)
    return sum(seen.values()) + sum(n)


def run_phase(phase: str, worker, teacher, rollouts: Rollouts, packed: bool, args, device):
    from teachers.hf_teacher import score_packed, score_padded

    worker.cfg.trainer.packing = "shared_prompt" if packed else "none"
    responses = rollouts.unpadded_responses()
    if phase == "teacher":
        model = teacher
        keys = rollouts.group_ids.tolist()
        pad = worker.tokenizer.pad_token_id
        dev = str(worker.device)
        if packed:
            fn = lambda: score_packed(model, rollouts.prompts, keys, responses, 8, args.micro_batch_tokens,  # noqa: E731
                                      len(rollouts), dev)
        else:
            fn = lambda: score_padded(model, rollouts.prompts, responses, pad, 8, args.padded_micro_batch, dev)  # noqa: E731
        return measure(fn, device, args.reps)
    if phase == "pi_old":
        return measure(lambda: worker.logprobs(rollouts), device, args.reps)
    step = iter(range(10**6))
    return measure(lambda: worker.update(rollouts, next(step)), device, args.reps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="CPU-sized shapes and model")
    p.add_argument("--prompts", type=int, nargs="+", help="prompt tokens (default 4096 16384 65536; small 64 512 2048)")
    p.add_argument("--answers", type=int, nargs="+", help="answer tokens (default 64 512; small 8 64)")
    p.add_argument("--group", type=int, default=8, help="G answers per prompt")
    p.add_argument("--groups", type=int, default=1, help="prompts (groups) per step")
    p.add_argument("--phases", nargs="+", default=["teacher", "pi_old", "update"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--micro-batch-tokens", type=int, default=None, help="packed budget (default 2 x largest group)")
    p.add_argument("--padded-micro-batch", type=int, default=None,
                   help="rows per padded pass (default G on the CPU, 1 on CUDA: 8 x 64K tokens do not fit in one)")
    p.add_argument("--attn", default=None, help="attention implementation (default flex_attention on CUDA, else sdpa)")
    p.add_argument("--frame-tokens", type=int, default=None, help="video tokens per frame (default 256; small 16)")
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--experts", type=int, default=None)
    p.add_argument("--experts-per-token", type=int, default=None)
    p.add_argument("--moe-intermediate", type=int, default=None)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--qwen-tokenizer", default=str(QWEN_FILES))
    args = p.parse_args()
    cuda = torch.cuda.is_available() and not args.small
    device = torch.device("cuda" if cuda else "cpu")
    small = dict(prompts=[64, 512, 2048], answers=[8, 64], frame_tokens=16, hidden=64, layers=2, heads=2, kv_heads=1,
                 head_dim=32, experts=4, experts_per_token=2, moe_intermediate=32)
    large = dict(prompts=[4096, 16384, 65536], answers=[64, 512], frame_tokens=256, hidden=2048, layers=4, heads=16,
                 kv_heads=4, head_dim=128, experts=16, experts_per_token=4, moe_intermediate=768)
    for key, value in (small if args.small else large).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.padded_micro_batch is None:
        args.padded_micro_batch = 1 if cuda else args.group
    largest = max(args.prompts) + args.group * max(args.answers)
    if args.micro_batch_tokens is None:
        args.micro_batch_tokens = 2 * largest
    attn = args.attn or ("flex_attention" if cuda else "sdpa")

    from models.factory import vision_layout
    from rl.policy import PolicyWorker

    root = Path(tempfile.mkdtemp(prefix="bench_packing_"))
    try:
        tokenizer = tokenizer_folder(args, root)
        cfg = job_config(args, root, tokenizer, args.group)
        cfg.trainer.device = device.type
        worker = PolicyWorker(cfg)
        set_attention(worker.lm, attn)
        # the teacher: a plain (unsharded) model of the student's shape, served in bf16 on CUDA as teachers are
        from rl.student import build_student

        teacher = build_student(cfg, worker.tokenizer, device=device)[0]
        teacher = teacher.to(device, torch.bfloat16 if cuda else torch.float32).eval()
        set_attention(teacher, attn)
        layout = vision_layout(worker.lm)
        vocab = len(worker.tokenizer)
        special = set(worker.tokenizer.all_special_ids)
        plain = torch.tensor([i for i in range(vocab) if i not in special])  # answer ids: no special token
        n_params = sum(p.numel() for p in worker.lm.parameters())
        say(f"device {device} ({torch.cuda.get_device_name() if cuda else 'CPU'}), attention {attn}, "
            f"student {n_params / 1e6:.1f}M parameters (hidden {args.hidden}, {args.layers} layers, {args.experts} "
            f"experts top-{args.experts_per_token}), vocabulary {vocab}, G={args.group}, {args.groups} group(s) "
            f"per step, padded rows per pass {args.padded_micro_batch}, packed budget {args.micro_batch_tokens} tokens")
        rows = []
        for prompt_len in args.prompts:
            prompts = [video_prompt(worker.tokenizer, layout, prompt_len, args.frame_tokens, seed=i)
                       for i in range(args.groups)]
            for answer in args.answers:
                rollouts = step_rollouts(prompts, args.group, answer, plain, seed=prompt_len + answer)
                if "update" in args.phases:  # on-policy ratios: pi_old from the worker itself
                    worker.cfg.trainer.packing = "shared_prompt"
                    pi = worker.logprobs(rollouts)
                    rollouts.old_logprobs[pi.rows] = pi.old
                work = sum(len(p.input_ids) + answer for p in rollouts.prompts)
                for phase in args.phases:
                    result = {}
                    for packed in (False, True):
                        try:
                            seconds, gib = run_phase(phase, worker, teacher, rollouts, packed, args, device)
                        except torch.OutOfMemoryError:
                            seconds, gib = float("nan"), float("nan")
                            torch.cuda.empty_cache()
                        result[packed] = (seconds, gib, forwarded_tokens(rollouts, packed))
                    rows.append((len(prompts[0].input_ids), answer, phase, result, work))
                    a, b = result[False], result[True]
                    say(f"  P={rows[-1][0]} T={answer} {phase}: padded {a[0]:.3f}s  packed {b[0]:.3f}s  "
                        f"({a[0] / b[0]:.2f}x)")
        say()
        say("| prompt | answer | phase | path | s (median) | seq tok/s | tokens forwarded | peak GiB | speed-up |")
        say("|---:|---:|---|---|---:|---:|---:|---:|---:|")
        for prompt_len, answer, phase, result, work in rows:
            for packed in (False, True):
                s, gib, fwd = result[packed]
                speed = result[False][0] / s if packed else 1.0
                say(f"| {prompt_len} | {answer} | {phase} | {'packed' if packed else 'padded'} | {s:.3f} | "
                    f"{work / s:,.0f} | {fwd:,} | {gib:.2f} | {speed:.2f}x |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
