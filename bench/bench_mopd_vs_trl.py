"""Our MOPD training step beside TRL's `DistillationTrainer` (on-policy, one teacher, reverse KL), in one run.

Same models, prompts, batch and generation length for both systems:
- student and teacher: 2-layer Qwen3-MoE (`qwen3_moe`, hidden 128, 4 experts, 2 routed) with the real Qwen3
  tokenizer (151,669 tokens), built deterministically (seeds 1 and 2) and saved with `save_pretrained`;
- prompts: the embedded suite's 8 training prompts of the reasoning and retrieval domains (4 each), rendered by
  each system with the Qwen3 chat template (`enable_thinking=False`); the script checks both tokenise them alike;
- batch: 8 prompts, one response each (8 sequences), sampled at temperature 1 (no top-p / top-k);
- generation length: exactly 64 new tokens per sequence (`min_new_tokens=64` in both, so end-of-turn cannot be
  sampled early; the script checks that 8 x 64 = 512 tokens were generated every step).

What one timed step contains
- ours (`rl.trainer.Trainer.train_step`, MOPD advantage + `gspo_token` loss, one teacher):
  transformers `generate` (sampler log-probs kept) -> rewards of the 8 answers (in-process) -> teacher forward
  over prompt + response (its log-prob of each sampled token) -> student forward without grad (pi_old) ->
  per-token advantage log p_teacher(y_t) - log pi_old(y_t) -> one student forward + backward of the clipped
  policy-gradient loss -> grad clip + AdamW step -> weight sync to the rollout engine.
  Row "ours (in-process)" hosts rollout engine and teacher in the trainer process (`num_workers=0`); row
  "ours (ray actors)" in one Ray actor each (`num_workers=1`), so each step also ships the weights to the rollout
  actor. Row "ours (bf16 engines)" (in-process) serves rollout engine and teacher in bfloat16
  (`engine_args: {dtype: bfloat16}`, as vLLM serves models) while the trainer keeps float32 weights; the sampler's
  log-probs then differ from the trainer's by rounding, which the loop's mismatch handling (TIS) absorbs.
- TRL (`trl.DistillationTrainer`, `beta=1.0` = reverse KL, always on-policy: it generates every batch itself):
  transformers `generate` -> teacher forward (hidden states) -> student forward -> the full-vocabulary reverse
  KL(student || teacher) on every response position (TRL's chunked kernel) + backward -> grad clip + AdamW step.
  Timed from the Trainer's `on_step_begin` to `on_step_end` callback (so its data loading and logging are not
  counted). It runs in float32 without gradient checkpointing, like our trainer (TRL's defaults, bf16 autocast and
  gradient checkpointing, are GPU-minded; `--trl-defaults` keeps them; `--trl-bf16` runs bf16 autocast without
  checkpointing, which was slower here: 10.9 s against 9.0 s a step).
- The systems alternate step by step (TRL, ours, ours (ray actors), TRL, ...: our steps run from TRL's step-end
  callback, outside TRL's clock), so load changes on a shared machine hit all of them alike.

The estimators differ by design: TRL sums the exact KL over the vocabulary at each position, MOPD uses the
sampled token's log-ratio as a per-token advantage (its expectation is the same reverse KL).

    python bench/bench_mopd_vs_trl.py [--steps 5] [--warmup 1] [--threads 2] [--systems trl ours ours_ray ours_bf16]

On a machine shared with other jobs, `--threads 1` avoids the intra-op thread stalls that make small decode-step
ops of every system crawl when the cores are oversubscribed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

BATCH = 8
NEW_TOKENS = 64
TEMPLATE_KWARGS = {"enable_thinking": False}
DOMAINS = ["reasoning", "retrieval"]
SPEC = dict(family="qwen3_moe", hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
            intermediate_size=256, moe_intermediate_size=128, num_experts=4, experts_per_token=2)
LR = 1e-5


@dataclass
class Timing:
    system: str
    step_s: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.step_s)

    @property
    def tokens_per_s(self) -> float:
        return statistics.median(self.tokens) / self.median_s


# ---------------------------------------------------------------------------- models, tokenizer, prompts


def qwen_tokenizer(src: Path, out: Path):
    """The real Qwen3 tokenizer from the shared files (vocab + merges + Qwen3 config, see its SOURCE.md)."""
    from transformers import AutoTokenizer

    needed = [src / "vocab.json", src / "merges.txt", src / "qwen3" / "tokenizer_config.json"]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise FileNotFoundError(f"--qwen-tokenizer {src}: missing {missing}")
    out.mkdir(parents=True, exist_ok=True)
    for p in needed:
        shutil.copy(p, out / p.name)
    tok = AutoTokenizer.from_pretrained(str(out))
    if len(tok) != 151669:
        raise ValueError(f"{src}: expected the 151,669-token Qwen3 vocabulary, got {len(tok)}")
    return tok


def build_models(work: Path, tokenizer) -> tuple[Path, Path]:
    """Student (seed 1) and teacher (seed 2) saved as Hugging Face folders; generation forced to 64 tokens."""
    from models.factory import TinyModelSpec, build_model, save_model

    folders = []
    for name, seed in (("student", 1), ("teacher", 2)):
        model = build_model(TinyModelSpec(**SPEC), tokenizer, seed=seed)
        model.generation_config.min_new_tokens = NEW_TOKENS
        save_model(model, tokenizer, work / name)
        folders.append(work / name)
    return folders[0], folders[1]


def task_args(work: Path) -> dict:
    return {"data_dir": str(work / "data"), "domains": DOMAINS, "n_train": BATCH // len(DOMAINS), "n_eval": 1}


def prompts(work: Path) -> list:
    """The 8 training samples (what both systems draw their batches from)."""
    from tasks.embedded import EmbeddedTasks

    return list(EmbeddedTasks(split="train", seed=0, **task_args(work)))


def check_same_prompt_ids(samples, tokenizer) -> None:
    """Our renderer and TRL's `apply_chat_template(tokenize=True)` must give the same prompt token ids."""
    from models.chat import ChatRenderer

    renderer = ChatRenderer(tokenizer, None, TEMPLATE_KWARGS)
    for s in samples:
        ours = renderer.render(s.messages).input_ids
        theirs = tokenizer.apply_chat_template(s.messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, **TEMPLATE_KWARGS)["input_ids"]
        if ours != list(theirs):
            raise AssertionError(f"prompt {s.id}: our ids and TRL's differ")


# ---------------------------------------------------------------------------- ours


class Ours:
    """Our `Trainer` on a MOPD job; `step()` times one `train_step()`."""

    def __init__(self, work: Path, student: Path, teacher: Path, workers: int, warmup: int, threads: int,
                 dtype: str = "float32"):
        import mopd  # noqa: F401  (registers the mopd estimator)
        from rl.config import load_config
        from rl.trainer import Trainer

        name = f"ours_w{workers}_{dtype}"
        engine_args = {"dtype": dtype}
        data = task_args(work)
        cfg = {
            "run": {"name": name, "dir": str(work / "runs"), "seed": 0, "resume": False},
            "model": {"path": str(student), "tokenizer": "model", "template_kwargs": TEMPLATE_KWARGS},
            "data": {
                "train": [{"source": "embedded", "args": {**data, "split": "train"}}],
                "eval": [{"source": "embedded", "args": {**data, "split": "eval"}}],
                "prompts_per_step": BATCH,
            },
            "rollout": {"backend": "hf", "num_workers": workers, "group_size": 1, "max_new_tokens": NEW_TOKENS,
                        "temperature": 1.0, "top_p": 1.0, "batch_size": BATCH, "threads_per_worker": threads,
                        "engine_args": engine_args},
            "teachers": [{"name": "teacher", "path": str(teacher), "domains": ["*"], "num_workers": workers,
                          "threads_per_worker": threads, "batch_size": BATCH, "template_kwargs": TEMPLATE_KWARGS,
                          "engine_args": engine_args}],
            "algorithm": {"advantage": "mopd", "policy_loss": "gspo_token", "updates_per_step": 1},
            "rewards": {"num_workers": 0},
            "optim": {"lr": LR, "grad_clip": 1.0},
            "trainer": {"steps": 1000, "micro_batch_size": BATCH, "threads": threads},
            "logging": {"progress": False, "tensorboard": False},
        }
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        self.trainer = Trainer(*load_config(path))
        system = "ours (ray actors)" if workers else "ours (in-process)"
        self.timing = Timing(system if dtype == "float32" else "ours (bf16 engines)")
        self.warmup = warmup
        self.i = 0
        self.phases: dict[str, list[float]] = {}

    def step(self) -> None:
        t0 = time.perf_counter()
        metrics = self.trainer.train_step()
        self.trainer.step += 1
        dt = time.perf_counter() - t0
        n = int(metrics["perf/generated_tokens"])
        if n != BATCH * NEW_TOKENS:
            raise AssertionError(f"{self.timing.system}: step {self.i} generated {n} tokens, expected {BATCH * NEW_TOKENS}")
        phases = {k[5:-2]: metrics[k] for k in ("time/generate_s", "time/teachers_s", "time/update_s", "time/sync_s")}
        if self.i >= self.warmup:
            self.timing.step_s.append(dt)
            self.timing.tokens.append(n)
            for k, v in phases.items():
                self.phases.setdefault(k, []).append(v)
        print(f"  {self.timing.system} step {self.i}: {dt:.2f}s ("
              + " ".join(f"{k}={v:.2f}" for k, v in phases.items()) + ")", flush=True)
        self.i += 1

    def close(self) -> None:
        self.trainer.close()


# ---------------------------------------------------------------------------- TRL


def run_trl(work: Path, student: Path, teacher: Path, samples, warmup: int, steps: int, trl_defaults: bool,
            between_steps, trl_bf16: bool = False) -> Timing:
    """TRL's trainer for warm-up + steps; `between_steps()` runs after each of its steps (the other systems)."""
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    timing = Timing("TRL DistillationTrainer" + (" (bf16)" if trl_bf16 else ""))
    tokenizer = AutoTokenizer.from_pretrained(str(student), padding_side="left")
    dataset = Dataset.from_list([{"prompt": [dict(m) for m in s.messages]} for s in samples])
    precision = {} if trl_defaults else {"bf16": trl_bf16, "gradient_checkpointing": False}
    args = DistillationConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
        max_steps=warmup + steps, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=1.0, weight_decay=0.0, beta=1.0, temperature=1.0, top_p=1.0, top_k=0,
        max_completion_length=NEW_TOKENS, generation_kwargs={"min_new_tokens": NEW_TOKENS},
        chat_template_kwargs=TEMPLATE_KWARGS, use_cpu=True, report_to="none", save_strategy="no",
        logging_steps=10_000, disable_tqdm=True, dataloader_num_workers=0, seed=0, **precision,
    )
    trainer = DistillationTrainer(model=str(student), teacher_model=str(teacher), args=args, train_dataset=dataset,
                                  processing_class=tokenizer)

    class StepClock(TrainerCallback):
        def __init__(self):
            self.i = 0
            self.t0 = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            dt = time.perf_counter() - self.t0
            lengths = trainer._metrics["train"]["completions/mean_length"]
            n = round(lengths[-1] * BATCH)
            if n != BATCH * NEW_TOKENS:
                raise AssertionError(f"TRL step {self.i} generated {n} tokens, expected {BATCH * NEW_TOKENS}")
            if self.i >= warmup:
                timing.step_s.append(dt)
                timing.tokens.append(n)
            print(f"  {timing.system} step {self.i}: {dt:.2f}s", flush=True)
            self.i += 1
            between_steps()

    trainer.add_callback(StepClock())
    trainer.train()
    return timing


# ---------------------------------------------------------------------------- main


def table(timings: list[Timing], baseline: Timing | None) -> str:
    rows = [f"| {'system':<26} | {'s/step (median)':>15} | {'generated tok/s':>15} | {'speed-up vs TRL':>15} |",
            f"|{'-' * 28}|{'-' * 16}:|{'-' * 16}:|{'-' * 16}:|"]
    for t in timings:
        speed = f"{baseline.median_s / t.median_s:.2f}x" if baseline else "-"
        rows.append(f"| {t.system:<26} | {t.median_s:>15.2f} | {t.tokens_per_s:>15.1f} | {speed:>15} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per system (after warm-up)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per system first")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (trainer and actors)")
    parser.add_argument("--systems", nargs="+", default=["trl", "ours", "ours_ray", "ours_bf16"],
                        choices=["trl", "ours", "ours_ray", "ours_bf16"])
    parser.add_argument("--qwen-tokenizer", type=Path, default=ROOT.parent / "shared" / "data" / "qwen_tokenizer",
                        help="folder with vocab.json, merges.txt and qwen3/tokenizer_config.json")
    parser.add_argument("--trl-defaults", action="store_true",
                        help="keep TRL's bf16 autocast and gradient checkpointing defaults")
    parser.add_argument("--trl-bf16", action="store_true",
                        help="TRL with bf16 autocast (its default precision) but without gradient checkpointing")
    parser.add_argument("--workdir", type=Path, default=None, help="keep models and runs here (default: a temp dir)")
    args = parser.parse_args()

    from models.factory import quiet_libraries

    quiet_libraries()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_mopd_trl_")
        work = Path(tmp.name)
    else:
        work = args.workdir
        work.mkdir(parents=True, exist_ok=True)
    try:
        tokenizer = qwen_tokenizer(args.qwen_tokenizer, work / "tokenizer")
        student, teacher = build_models(work, tokenizer)
        samples = prompts(work)
        check_same_prompt_ids(samples, tokenizer)
        lengths = [len(tokenizer.apply_chat_template(s.messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True, **TEMPLATE_KWARGS)["input_ids"])
                   for s in samples]
        load_before = os.getloadavg()
        print(f"models: 2-layer qwen3_moe, vocab {len(tokenizer)}; {len(samples)} prompts of {min(lengths)}-"
              f"{max(lengths)} tokens; batch {BATCH} x {NEW_TOKENS} new tokens; {args.threads} threads; "
              f"{args.warmup} warm-up + {args.steps} timed steps per system", flush=True)
        ours = [Ours(work, student, teacher, 1 if name == "ours_ray" else 0, args.warmup, args.threads,
                     "bfloat16" if name == "ours_bf16" else "float32")
                for name in args.systems if name != "trl"]

        def step_ours() -> None:
            for runner in ours:
                runner.step()

        try:
            timings: list[Timing] = []
            if "trl" in args.systems:
                timings.append(run_trl(work, student, teacher, samples, args.warmup, args.steps, args.trl_defaults,
                                       step_ours, trl_bf16=args.trl_bf16))
            else:
                for _ in range(args.warmup + args.steps):
                    step_ours()
            timings += [r.timing for r in ours]
            phase_lines = [f"{r.timing.system} medians: " + ", ".join(
                f"{k} {statistics.median(v):.2f}s" for k, v in r.phases.items()) for r in ours]
        finally:
            for runner in ours:
                runner.close()
        load_after = os.getloadavg()
    finally:
        if tmp is not None:
            tmp.cleanup()
    baseline = next((t for t in timings if t.system.startswith("TRL")), None)
    print(f"\nload average (1/5/15 min) before: {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, "
          f"after: {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f}; {os.cpu_count()} CPUs")
    print("\n".join(phase_lines))
    print(table(timings, baseline))


if __name__ == "__main__":
    main()
