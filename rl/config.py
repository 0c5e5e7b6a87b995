"""The job's typed configuration: every option documented where it is declared (`help`).

YAML files map onto `JobConfig` (see `rl.config_loader` for composition, overrides and errors). `describe_fields`
renders these helps as the README's key reference.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import re
from pathlib import Path
from typing import Any, Literal

from core.options import option as _help
from models.attention import AttentionChoice
from rl.config_loader import COMMAND_LINE, apply_overrides, build_dataclass, load_yaml_tree, to_dict


def _engine_names() -> list[str]:
    from rollout.base import ENGINES

    return ENGINES.names()


def _engine_options(name: str) -> type | None:
    from rollout.base import engine_options

    return engine_options(name)


def _teacher_backend_names() -> list[str]:
    from teachers.backends import TEACHER_BACKENDS

    return TEACHER_BACKENDS.names()


def _teacher_options(name: str) -> type | None:
    from teachers.backends import teacher_options

    return teacher_options(name)


def _estimator_names() -> list[str]:
    from rl.algorithms import advantage_estimator_names

    return advantage_estimator_names()


def _policy_loss_names() -> list[str]:
    from rl.algorithms import policy_loss_names

    return policy_loss_names()


@dataclass
class RunConfig:
    name: str = _help("Run folder name under `dir`; a second `train` of the same run resumes it.", default="run")
    dir: str = _help("Parent folder of runs.", default="runs")
    seed: int = _help("Seed of everything (data order, sampling, init).", default=0)
    resume: bool = _help("Continue from the latest checkpoint of the run folder if there is one.", default=True)
    allow_config_change: bool = _help(
        "Resume a run folder although its recorded config differs in keys a resumed run should keep (algorithm, "
        "data, model, ...); without it such a resume is refused with the keys named.", default=False)


@dataclass
class TinyModelConfig:
    family: Literal["qwen3_vl_moe", "qwen3_moe", "qwen3"] = _help("transformers model family.", default="qwen3_vl_moe")
    hidden_size: int = _help("Hidden size of the language model.", default=128, ge=1)
    num_layers: int = _help("Decoder layers.", default=2, ge=1)
    num_heads: int = _help("Query heads.", default=4, ge=1)
    num_kv_heads: int = _help("Key/value heads (GQA).", default=2, ge=1)
    head_dim: int = _help("Head size (>= 32 for vLLM's CPU backend).", default=32, ge=1)
    intermediate_size: int = _help("Dense MLP size.", default=256, ge=1)
    moe_intermediate_size: int = _help("Expert MLP size.", default=128, ge=1)
    num_experts: int = _help("Experts per MoE layer.", default=4, ge=1)
    experts_per_token: int = _help("Experts routed per token.", default=2, ge=1)


@dataclass
class LoraConfig:
    enabled: bool = _help("Train LoRA adapters (peft) on the language model instead of all its weights.", default=False)
    r: int = _help("LoRA rank.", default=8, ge=1)
    alpha: int = _help("LoRA alpha.", default=16)
    dropout: float = _help("LoRA dropout.", default=0.0, ge=0, le=1)
    target_modules: list[str] = _help(
        "Module names to adapt.", default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )


@dataclass
class DSAModelConfig:
    enabled: bool = _help("Attach DeepSeek Sparse Attention (lightning indexer + top-k GQA attention).", default=False)
    topk: int = _help("Keys each query attends to (fewer candidates: exactly dense).", default=2048, ge=1)
    index_heads: int = _help("Indexer query heads.", default=4, ge=1)
    index_head_dim: int = _help("Indexer head size.", default=64, ge=1)
    stage: Literal["none", "dense_warmup", "sparse"] = _help(
        "Indexer training: 'dense_warmup' (main model frozen, dense attention, indexer learns the attention "
        "distribution), 'sparse' (top-k attention, indexer keeps its KL on the selected keys, input detached), "
        "'none' (the indexer is not trained).",
        default="none",
    )
    indexer_loss_weight: float = _help("Weight of the indexer KL added to the loss in the two stages.", default=1.0, ge=0)


@dataclass
class ModelConfig:
    path: str | None = _help("Hugging Face folder of the student; null builds `tiny` from scratch.", default=None)
    tiny: TinyModelConfig = _help("Size of a model built from scratch (when `path` is null).", default_factory=TinyModelConfig)
    tokenizer: str = _help(
        "Tokenizer folder, 'model' (the model folder's own) or 'embedded' (built from the embedded suite).",
        default="model",
    )
    freeze_vision: bool = _help("Freeze the vision encoder and projector (no grad, no optimizer state).", default=True)
    vision_from: str | None = _help(
        "Start the vision encoder and projector from this saved model of the same family (a pretrained tower), "
        "then train or freeze them as `freeze_vision` says.",
        default=None,
    )
    lora: LoraConfig = _help("LoRA on the language model.", default_factory=LoraConfig)
    dsa: DSAModelConfig = _help("DeepSeek Sparse Attention on the language model.", default_factory=DSAModelConfig)
    dtype: Literal["float32", "bfloat16", "float16"] = _help("Training dtype of the student.", default="float32")
    attention: AttentionChoice = _help(
        "Attention implementation of the student in training. 'auto': sdpa_flex where shared-prompt packed "
        "micro-batches run on CUDA (a row of several responses through flex_attention's block-sparse mask instead "
        "of a dense [L, L] one, a row of one sequence through sdpa's causal kernel), else the model's own (sdpa). "
        "DSA layers run their own sparse attention whatever this says.", default="auto")
    template_kwargs: dict[str, Any] = _help(
        "Extra chat-template arguments, e.g. {enable_thinking: false} for Qwen3 (variables the template reads; "
        "`check` refuses others when the tokenizer is at hand).", default_factory=dict
    )


@dataclass
class TaskConfig:
    source: str = _help("Registered task source (embedded, niah, bfcl, charades_sta, qvhighlights, ...).", default="embedded")
    args: dict[str, Any] = _help("Keyword arguments of the task source.", default_factory=dict)
    weight: float = _help(
        "Share of this source in the training pool: its samples enter it `weight` times (0.5 = a seeded half). "
        "Held-out sources ignore it.",
        default=1.0, gt=0,
    )


@dataclass
class DataConfig:
    train: list[TaskConfig] = _help("Training task sources (mixed, shuffled by seed).", default_factory=lambda: [TaskConfig()])
    eval: list[TaskConfig] = _help(
        "Held-out task sources.", default_factory=lambda: [TaskConfig(args={"split": "eval"})]
    )
    prompts_per_step: int = _help("Prompts per training step (each gets rollout.group_size responses).", default=16, ge=1)
    video_fps: float = _help("Frames per second sampled from video files.", default=2.0, gt=0)
    video_max_frames: int = _help("Most frames kept per video (uniform over the clip beyond that).", default=32, ge=1)
    video_size: list[int] | int | None = _help(
        "Decoded frame size: [H, W], or the long side keeping the aspect ratio; null = [32, 32].", default=None, ge=1
    )
    decode_workers: int = _help("Threads decoding the next batches' videos while the current step trains.", default=2, ge=1)
    prefetch_batches: int = _help("Batches decoded ahead of the trainer.", default=2, ge=0)


@dataclass
class RolloutConfig:
    backend: str = _help(
        "Generation engine, a registered rollout backend: 'hf' (transformers generate), 'vllm', or 'reference' "
        "(the tasks' demonstration answers, for supervised warm-up through the same loop).",
        default="hf", choices=_engine_names,
    )
    num_workers: int = _help("Ray rollout actors; 0 runs the engine inside the trainer process.", default=1, ge=0)
    group_size: int = _help("Responses per prompt (G).", default=4, ge=1)
    max_new_tokens: int = _help("Generation length cap; longer responses are flagged truncated.", default=32, ge=1)
    temperature: float = _help("Sampling temperature (0: greedy).", default=1.0, ge=0)
    top_p: float = _help("Nucleus sampling threshold.", default=1.0, gt=0, le=1)
    batch_size: int = _help("Prompts per generate call inside a worker.", default=64, ge=1)
    threads_per_worker: int = _help("torch CPU threads of each rollout actor.", default=2, ge=0)
    ray_address: str | None = _help("Ray cluster address; null starts a local Ray instance.", default=None)
    gpus_per_worker: float = _help("GPUs per rollout actor (Ray placement).", default=0.0, ge=0)
    engine_args: dict[str, Any] = _help(
        "The engine's own settings, typed per backend (`rollout.engine_args.<key> (<backend>)` rows below; "
        "rollout/options.py): hf: dtype, device, threads; vllm: tensor_parallel_size, gpu_memory_utilization, "
        "sync, check_sync, sleep_level, ... (docs/vllm.md). Unknown keys are errors.",
        default_factory=dict, options=_engine_options, options_of="backend",
    )


@dataclass
class TeacherConfig:
    name: str = _help("Teacher name (metrics, routing).")
    path: str = _help("Hugging Face folder of the teacher (same vocabulary as the student).")
    domains: list[str] = _help("Domains routed to this teacher ('*' = all).", default_factory=lambda: ["*"])
    modalities: list[str] = _help("Sample modalities routed here: 'video', 'text' or '*'.", default_factory=lambda: ["*"])
    view: Literal["native", "text", "timestamps", "no_video"] = _help(
        "What the teacher sees: 'native' (the student's prompt), 'text' (video replaced by timestamped "
        "captions), 'timestamps' (timestamps only), 'no_video' (video removed).",
        default="native",
    )
    weight: float = _help("Weight when several teachers serve one domain (normalised per sample).", default=1.0, gt=0)
    topk: int = _help("Also return the teacher's top-k log-probs at every response position (0 = off).", default=0, ge=0)
    backend: str = _help("Scoring engine, a registered teacher backend (teachers/backends.py): 'hf' or 'vllm'.",
                         default="hf", choices=_teacher_backend_names)
    num_workers: int = _help("Ray actors serving this teacher; 0 scores inside the trainer process.", default=1, ge=0)
    threads_per_worker: int = _help("torch CPU threads of each teacher actor.", default=2, ge=0)
    gpus_per_worker: float = _help("GPUs per teacher actor (Ray placement).", default=0.0, ge=0)
    batch_size: int = _help("Sequences per teacher forward pass.", default=64, ge=1)
    template_kwargs: dict[str, Any] = _help(
        "Extra chat-template arguments of this teacher (variables its template reads; `check` refuses others when "
        "the teacher's tokenizer is at hand).", default_factory=dict)
    engine_args: dict[str, Any] = _help(
        "The backend's own settings, typed per backend (`teachers[].engine_args.<key> (<backend>)` rows; "
        "teachers/options.py): hf: dtype, device; vllm: tensor_parallel_size, gpu_memory_utilization, ... "
        "Unknown keys are errors.", default_factory=dict, options=_teacher_options, options_of="backend")


@dataclass
class AlgorithmConfig:
    advantage: str = _help("Registered advantage estimator: mopd, gspo, grpo, sft, ...", default="mopd",
                           choices=_estimator_names)
    policy_loss: str = _help("Registered policy loss: gspo, gspo_token, grpo, nll, ...", default="gspo_token",
                             choices=_policy_loss_names)
    clip_low: float = _help("Ratio clip: lower bound is 1 - clip_low.", default=0.2, ge=0, le=1)
    clip_high: float = _help("Ratio clip: upper bound is 1 + clip_high.", default=0.28, ge=0)
    loss_agg: Literal["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"] = _help(
        "Loss aggregation (default: each sequence's length-normalised mean, then the mean over sequences).",
        default="seq_mean_token_mean",
    )
    norm_std: bool = _help("Divide group-centred rewards by the group std.", default=True)
    adv_eps: float = _help("Added to the group std before dividing (norm_std), so a near-constant group stays finite.",
                           default=1e-6, ge=0)
    outcome_weight: float = _help("MOPD: weight of the added group-normalised outcome advantage (0 = off).", default=0.0, ge=0)
    mopd_token_weight: float = _help(
        "MOPD: weight of the sampled-token reverse-KL advantage (0 = only the dense logit losses teach).", default=1.0, ge=0
    )
    mopd_topk: int = _help("MOPD: keep only tokens inside both teacher and student top-k (0 = off).", default=0, ge=0)
    mopd_adv_clip: float = _help("MOPD: clip per-token advantages to [-c, c] (0 = off).", default=0.0, ge=0)
    mopd_baseline: Literal["none", "group"] = _help(
        "MOPD: 'group' subtracts the leave-one-out mean advantage of the prompt's other responses per position.",
        default="none",
    )
    logit_losses: dict[str, float] = _help(
        "Registered logit losses added to the policy loss with a weight, e.g. {teacher_kl: 1.0}: MOPD's reverse KL "
        "over each routed teacher's top-k tokens plus a tail bucket (needs teachers[].topk > 0).",
        default_factory=dict,
    )
    logit_loss_agg: Literal["token_mean", "seq_mean_token_mean"] = _help(
        "How the logit losses average over a mini-batch: 'token_mean' (every response token weighs the same, so "
        "long answers carry most of the term) or 'seq_mean_token_mean' (each sequence's token mean, then the mean "
        "over sequences: every prompt weighs the same, whatever its answer's length).",
        default="token_mean",
    )
    mismatch: Literal["none", "tis", "mask"] = _help(
        "Sampler/trainer log-prob mismatch: 'tis' weights tokens by min(pi_old/pi_sampler, mismatch_cap); "
        "'mask' drops tokens whose ratio leaves [mismatch_low, mismatch_high] (MiMo-V2-Flash).",
        default="tis",
    )
    mismatch_cap: float = _help("Truncation C of the TIS weight.", default=2.0, gt=0)
    mismatch_low: float = _help("'mask' rule: lowest kept pi_old/pi_sampler.", default=0.5, ge=0)
    mismatch_high: float = _help("'mask' rule: highest kept pi_old/pi_sampler.", default=2.0, gt=0)
    kl_coef: float = _help("KL penalty to the reference (initial) model (k3 estimator); 0 = off.", default=0.0, ge=0)
    entropy_coef: float = _help("Entropy bonus (entropy is always logged).", default=0.0, ge=0)
    truncated: Literal["keep", "drop", "downweight"] = _help("What truncated responses count for.", default="keep")
    truncated_weight: float = _help("Loss weight of truncated responses under 'downweight'.", default=0.5, ge=0, le=1)
    filter_zero_variance_groups: bool = _help("Drop groups whose rewards are all equal from the loss.", default=False)
    updates_per_step: int = _help("Optimizer updates per rollout batch (mini-batches, one pass).", default=1, ge=1)


@dataclass
class RewardsConfig:
    routes: dict[str, Any] = _help(
        "Domain -> reward: a registered name, 'module:function', 'path/file.py:function', or a weighted list "
        "[{reward: ..., weight: ...}].",
        default_factory=lambda: {
            "video": "temporal_iou",
            "retrieval": "record_value",
            "tool": "tool_outcome",
            "reasoning": "numeric_match",
        },
    )
    num_workers: int = _help(
        "Reward worker processes; 0 scores in the trainer process (timeouts still hold: a call that overruns is "
        "abandoned in its thread).", default=2, ge=0)
    timeout_s: float = _help("Per-call time limit of a reward function.", default=10.0, gt=0)
    load_timeout_s: float = _help(
        "Time limit on importing a reward's module (at `check`, in the trainer and in each worker): a module that "
        "blocks at import is an error naming it, not a hang.", default=30.0, gt=0)
    on_error: Literal["raise", "zero"] = _help(
        "A reward function that raises / returns garbage / times out: stop with a named error, or give 0 and count "
        "(with a warning, and still an error past max_error_frac).",
        default="raise",
    )
    max_error_frac: float = _help(
        "on_error 'zero': the largest share of one reward's samples that may fail (counted over the run, judged "
        "from its 8th sample on); beyond it the reward is broken, not flaky, and the run stops naming it "
        "(1 = never stop).", default=0.5, ge=0, le=1)


@dataclass
class OptimConfig:
    lr: float = _help("AdamW learning rate.", default=1e-4, ge=0)
    weight_decay: float = _help("AdamW weight decay.", default=0.0, ge=0)
    betas: list[float] = _help("AdamW betas (two numbers in [0, 1)).", default_factory=lambda: [0.9, 0.999], ge=0)
    grad_clip: float = _help("Global gradient-norm clip (0 = off).", default=1.0, ge=0)
    warmup_steps: int = _help("Linear warm-up steps.", default=0, ge=0)
    schedule: Literal["constant", "cosine"] = _help("Learning-rate schedule after warm-up.", default="constant")


@dataclass
class TrainerConfig:
    steps: int = _help("Training steps (one rollout batch each).", default=100, ge=1)
    micro_batch_size: int = _help(
        "Sequences per forward/backward (gradient accumulation); with shared-prompt packing, the most sequences "
        "one packed micro-batch holds (a group larger than this gets a micro-batch of its own).", default=64, ge=1)
    packing: Literal["auto", "shared_prompt", "none"] = _help(
        "How the student's forwards (pi_old, reference, update) lay out sequences. 'shared_prompt': a group's "
        "prompt once, then its G responses, each attending to the prompt and itself only, in padding-free "
        "micro-batches of micro_batch_tokens (exact: the same log-probs, loss and gradients as 'none'). 'none': "
        "every response with its own left-padded copy of the prompt, micro_batch_size rows per pass. 'auto' is "
        "shared_prompt when rollout.group_size > 1 and no DSA indexer stage trains (with one response per prompt "
        "there is nothing to share; the indexer KL is a mean over query positions, and a shared prompt counts its "
        "queries once instead of G times).", default="auto")
    micro_batch_tokens: int = _help(
        "Shared-prompt packing: tokens per packed micro-batch (each group's prompt counted once plus its "
        "responses); whole groups stay together and a group over the budget gets a micro-batch of its own. On "
        "CUDA with flex_attention the mask is block-sparse; elsewhere it is dense and attention costs the square "
        "of a micro-batch's tokens, so keep the budget to a few groups there (the embedded CPU configs: 1200).",
        default=16384, ge=1)
    checkpoint_every: int = _help("Checkpoint every N steps (and always at the end); 0 = only at the end.", default=50, ge=0)
    keep_checkpoints: int = _help("Checkpoints kept (oldest deleted); 0 = keep all.", default=2, ge=0)
    eval_every: int = _help("Held-out evaluation every N steps (and at start and end); 0 = only start and end.", default=0, ge=0)
    eval_at_start: bool = _help("Evaluate the starting model (the 'before' column).", default=True)
    eval_teachers: bool = _help("Also evaluate each teacher on its routed domains, in its own view.", default=False)
    threads: int = _help("torch CPU threads of the trainer process (0 = torch's default).", default=0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = _help(
        "Where the student trains: 'auto' is CUDA when torch sees a GPU, else the CPU.", default="auto")
    precision: Literal["auto", "float32", "bf16_mixed"] = _help(
        "Training precision: 'bf16_mixed' computes in bf16 over fp32 master weights, optimizer state and fp32 "
        "gradient reduction (FSDP2's mixed precision); 'auto' is bf16_mixed on CUDA and float32 on the CPU.",
        default="auto")
    world_size: int = _help("Training ranks (FSDP2 shards the student over them; across nodes with Ray).", default=1, ge=1)
    launcher: Literal["auto", "local", "torchrun", "ray"] = _help(
        "How training ranks start: 'torchrun' (`torchrun --nproc-per-node N -m cli train ...`, no Ray), 'ray' "
        "(actors in the placement plan's bundles), 'local' (one rank in-process); 'auto' is torchrun inside a "
        "torchrun job, ray for world_size > 1, else local.", default="auto")
    gpus_per_rank: float = _help("GPUs per training rank in the placement plan (CUDA training).", default=1.0, ge=0)
    activation_checkpointing: Literal["auto", "on", "selective", "off"] = _help(
        "Recompute each decoder layer's activations in the backward pass ('on'); 'selective' keeps the attention "
        "kernels' outputs and recomputes the rest (models/checkpointing.py); 'auto' is on for CUDA.", default="auto")
    offload: Literal["none", "cpu"] = _help(
        "FSDP2 CPU offload of parameters, gradients and optimizer state (few GPUs, large student).", default="none")
    collective_timeout_s: float = _help(
        "A collective that waits longer than this fails (a dead or stuck rank stops the job, not hangs it).",
        default=900.0, gt=0)
    logprob_chunk_rows: int = _help(
        "Token rows per chunk of the hidden-state log-prob pass (0 = sized from a memory budget).", default=0, ge=0)
    weight_sync_mb: float = _help("Size of the weight buckets streamed from the shards to the engines.", default=512.0, gt=0)


@dataclass
class EvalConfig:
    max_new_tokens: int = _help("Generation cap in evaluation.", default=48, ge=1)
    batch_size: int = _help("Prompts per generate call in evaluation.", default=64, ge=1)
    greedy: bool = _help("Greedy decoding (else sampling at rollout.temperature).", default=True)
    engine: Literal["auto", "hf", "rollout"] = _help(
        "What generates held-out answers, with the student's synced weights: 'rollout' (the rollout engines), "
        "'hf' (a transformers engine in the controller's process); 'auto' is rollout for vLLM, else hf.",
        default="auto")


@dataclass
class LoggingConfig:
    progress: bool = _help("Show a progress bar with step, reward and KL.", default=True)
    tensorboard: bool = _help("Write TensorBoard events under the run folder.", default=True)
    wandb: bool = _help("Log to Weights & Biases (needs the wandb package and a login).", default=False)
    wandb_project: str = _help("W&B project.", default="vlpost")


@dataclass
class ClusterConfig:
    gpus: int = _help("GPUs the job may use in all (0 = undeclared); `check` fails when the placement needs more.",
                      default=0)


@dataclass
class JobConfig:
    run: RunConfig = _help("Run identity and resume.", default_factory=RunConfig)
    model: ModelConfig = _help("The student.", default_factory=ModelConfig)
    data: DataConfig = _help("Training and held-out tasks.", default_factory=DataConfig)
    rollout: RolloutConfig = _help("On-policy generation.", default_factory=RolloutConfig)
    teachers: list[TeacherConfig] = _help("Teachers and their routing (MOPD).", default_factory=list)
    algorithm: AlgorithmConfig = _help("Advantage estimator, policy loss and their options.", default_factory=AlgorithmConfig)
    rewards: RewardsConfig = _help("Reward per domain.", default_factory=RewardsConfig)
    optim: OptimConfig = _help("Optimizer.", default_factory=OptimConfig)
    trainer: TrainerConfig = _help("Loop length, checkpoints, evaluation cadence.", default_factory=TrainerConfig)
    eval: EvalConfig = _help("Held-out evaluation.", default_factory=EvalConfig)
    logging: LoggingConfig = _help("Progress, metrics and dashboards.", default_factory=LoggingConfig)
    cluster: ClusterConfig = _help("The cluster the placement must fit.", default_factory=ClusterConfig)

    def validate(self) -> None:
        """Every cross-field rule, in one place: `load_config` runs it, so `check`, `train`, `eval` and the demo
        see the same verdict (ValueError; the loader adds the file)."""
        problems = cross_field_problems(self)
        if problems:
            raise ValueError(problems[0] + (f" (and {len(problems) - 1} more: {'; '.join(problems[1:])})"
                                            if len(problems) > 1 else ""))

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) / self.run.name


def load_config(path: str | Path, overrides: list[str] | None = None) -> tuple[JobConfig, dict]:
    """Read, compose, override and validate a job file. Returns (typed config, resolved plain dict)."""
    data, provenance = load_yaml_tree(path)
    provenance.setdefault("", str(path))
    data = apply_overrides(data, list(overrides or []), provenance)
    anchor_reward_files(data, provenance)
    cfg = build_dataclass(JobConfig, data, provenance)
    return cfg, to_dict(cfg)


_REWARD_FILE = re.compile(r"^(?P<file>[^:]+\.py):(?P<fn>[\w.]+)$")


def anchor_reward_files(data: dict, provenance: dict[str, str]) -> None:
    """A reward route `path/file.py:function` with a relative path is relative to the YAML file that names it
    (as `base:` is), not to the working directory; on the command line, to the working directory."""
    routes = (data.get("rewards") or {}).get("routes") or {}
    if not isinstance(routes, dict):
        return

    def anchored(spec: Any, key: str) -> Any:
        match = _REWARD_FILE.match(spec) if isinstance(spec, str) else None
        source = provenance.get(key, COMMAND_LINE)
        if match is None or Path(match["file"]).is_absolute() or source == COMMAND_LINE:
            return spec
        return f"{Path(source).parent / match['file']}:{match['fn']}"

    for domain, spec in routes.items():
        key = f"rewards.routes.{domain}"
        if isinstance(spec, list):
            for i, item in enumerate(spec):
                if isinstance(item, dict) and "reward" in item:
                    item["reward"] = anchored(item["reward"], f"{key}.{i}.reward")
        else:
            routes[domain] = anchored(spec, key)


# Advantage estimators that normalise within a prompt's group: with one response per prompt every advantage is 0.
GROUP_ESTIMATORS = ("grpo", "gspo")


def cross_field_problems(cfg: JobConfig) -> list[str]:
    """Rules that tie two or more keys together (each key's own type and bounds are the loader's)."""
    problems: list[str] = []
    alg, g = cfg.algorithm, cfg.rollout.group_size
    names = [t.name for t in cfg.teachers]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        problems.append(f"teachers: duplicate teacher names {duplicates}")
    if alg.advantage == "mopd" and not cfg.teachers:
        problems.append("algorithm.advantage is 'mopd' but no teachers are configured")
    if g == 1:
        one = "rollout.group_size is 1 (one response per prompt)"
        if alg.filter_zero_variance_groups:
            problems.append(f"algorithm.filter_zero_variance_groups needs rollout.group_size >= 2: a group of one "
                            f"response always has zero variance, so every token would be masked ({one})")
        if alg.advantage in GROUP_ESTIMATORS:
            problems.append(f"algorithm.advantage {alg.advantage!r} normalises rewards within a group: every "
                            f"advantage would be 0 ({one}); use rollout.group_size >= 2")
        if alg.outcome_weight > 0:
            problems.append(f"algorithm.outcome_weight > 0 adds a group-normalised outcome advantage, always 0 "
                            f"with {one}")
        if alg.mopd_baseline == "group":
            problems.append(f"algorithm.mopd_baseline 'group' subtracts the other responses' mean: there are none "
                            f"({one})")
    if alg.mismatch == "mask" and alg.mismatch_low >= alg.mismatch_high:
        problems.append(f"algorithm.mismatch_low ({alg.mismatch_low}) must be below mismatch_high "
                        f"({alg.mismatch_high})")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        problems.append(f"optim.betas must be two numbers in [0, 1), got {cfg.optim.betas}")
    if alg.mopd_topk and not all(t.topk >= alg.mopd_topk for t in cfg.teachers):
        problems.append(f"algorithm.mopd_topk={alg.mopd_topk} needs every teacher's topk >= {alg.mopd_topk}")
    problems.extend(_logit_loss_problems(cfg))
    if cfg.model.lora.enabled and cfg.trainer.world_size > 1:
        problems.append("model.lora with trainer.world_size > 1 is not supported: LoRA trains on one rank")
    if cfg.trainer.precision == "bf16_mixed" and cfg.model.dtype != "float32":
        problems.append("trainer.precision 'bf16_mixed' keeps fp32 master weights: set model.dtype to float32 "
                        f"(got {cfg.model.dtype!r})")
    return problems


def _logit_loss_problems(cfg: JobConfig) -> list[str]:
    from rl.algorithms import LOGIT_LOSSES

    problems = []
    without_topk = [t.name for t in cfg.teachers if t.topk <= 0]
    for name, weight in cfg.algorithm.logit_losses.items():
        if name not in LOGIT_LOSSES:
            problems.append(f"algorithm.logit_losses.{name}: {LOGIT_LOSSES.unknown(name)}")
        elif LOGIT_LOSSES.info(name).get("needs_teacher_topk") and (without_topk or not cfg.teachers):
            problems.append(f"algorithm.logit_losses.{name} needs teachers with topk > 0 "
                            f"(not: {without_topk or 'no teachers'})")
        if not weight >= 0:
            problems.append(f"algorithm.logit_losses.{name}: weight must be >= 0, got {weight}")
    return problems


def algorithm_default(key: str) -> Any:
    """`AlgorithmConfig`'s declared default of `key`: what an algorithm reads when its cfg lacks the key."""
    for f in dataclasses.fields(AlgorithmConfig):
        if f.name == key:
            if f.default is not dataclasses.MISSING:
                return f.default
            return f.default_factory()  # type: ignore[misc]
    raise KeyError(f"{key!r} is not an algorithm option (rl.config.AlgorithmConfig)")
