"""The job's typed configuration: every option documented where it is declared (`help`).

YAML files map onto `JobConfig` (see `rl.config_loader` for composition, overrides and errors). `describe_fields`
renders these helps as the README's key reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rl.config_loader import apply_overrides, build_dataclass, load_yaml_tree, to_dict


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class RunConfig:
    name: str = _help("Run folder name under `dir`; a second `train` of the same run resumes it.", default="run")
    dir: str = _help("Parent folder of runs.", default="runs")
    seed: int = _help("Seed of everything (data order, sampling, init).", default=0)
    resume: bool = _help("Continue from the latest checkpoint of the run folder if there is one.", default=True)


@dataclass
class TinyModelConfig:
    family: Literal["qwen3_vl_moe", "qwen3_moe", "qwen3"] = _help("transformers model family.", default="qwen3_vl_moe")
    hidden_size: int = _help("Hidden size of the language model.", default=128)
    num_layers: int = _help("Decoder layers.", default=2)
    num_heads: int = _help("Query heads.", default=4)
    num_kv_heads: int = _help("Key/value heads (GQA).", default=2)
    head_dim: int = _help("Head size (>= 32 for vLLM's CPU backend).", default=32)
    intermediate_size: int = _help("Dense MLP size.", default=256)
    moe_intermediate_size: int = _help("Expert MLP size.", default=128)
    num_experts: int = _help("Experts per MoE layer.", default=4)
    experts_per_token: int = _help("Experts routed per token.", default=2)


@dataclass
class LoraConfig:
    enabled: bool = _help("Train LoRA adapters (peft) on the language model instead of all its weights.", default=False)
    r: int = _help("LoRA rank.", default=8)
    alpha: int = _help("LoRA alpha.", default=16)
    dropout: float = _help("LoRA dropout.", default=0.0)
    target_modules: list[str] = _help(
        "Module names to adapt.", default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )


@dataclass
class DSAModelConfig:
    enabled: bool = _help("Attach DeepSeek Sparse Attention (lightning indexer + top-k GQA attention).", default=False)
    topk: int = _help("Keys each query attends to (fewer candidates: exactly dense).", default=2048)
    index_heads: int = _help("Indexer query heads.", default=4)
    index_head_dim: int = _help("Indexer head size.", default=64)
    stage: Literal["none", "dense_warmup", "sparse"] = _help(
        "Indexer training: 'dense_warmup' (main model frozen, dense attention, indexer learns the attention "
        "distribution), 'sparse' (top-k attention, indexer keeps its KL on the selected keys, input detached), "
        "'none' (the indexer is not trained).",
        default="none",
    )
    indexer_loss_weight: float = _help("Weight of the indexer KL added to the loss in the two stages.", default=1.0)


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
    template_kwargs: dict[str, Any] = _help(
        "Extra chat-template arguments, e.g. {enable_thinking: false} for Qwen3.", default_factory=dict
    )


@dataclass
class TaskConfig:
    source: str = _help("Registered task source (embedded, niah, bfcl, charades_sta, qvhighlights, ...).", default="embedded")
    args: dict[str, Any] = _help("Keyword arguments of the task source.", default_factory=dict)
    weight: float = _help(
        "Share of this source in the training pool: its samples enter it `weight` times (0.5 = a seeded half). "
        "Held-out sources ignore it.",
        default=1.0,
    )


@dataclass
class DataConfig:
    train: list[TaskConfig] = _help("Training task sources (mixed, shuffled by seed).", default_factory=lambda: [TaskConfig()])
    eval: list[TaskConfig] = _help(
        "Held-out task sources.", default_factory=lambda: [TaskConfig(args={"split": "eval"})]
    )
    prompts_per_step: int = _help("Prompts per training step (each gets rollout.group_size responses).", default=16)
    video_fps: float = _help("Frames per second sampled from video files.", default=2.0)
    video_max_frames: int = _help("Most frames kept per video (uniform over the clip beyond that).", default=32)
    video_size: list[int] | int | None = _help(
        "Decoded frame size: [H, W], or the long side keeping the aspect ratio; null = [32, 32].", default=None
    )
    decode_workers: int = _help("Threads decoding the next batches' videos while the current step trains.", default=2)
    prefetch_batches: int = _help("Batches decoded ahead of the trainer.", default=2)


@dataclass
class RolloutConfig:
    backend: Literal["hf", "vllm", "reference"] = _help(
        "Generation engine: 'hf' (transformers generate), 'vllm', or 'reference' (the tasks' demonstration "
        "answers, for supervised warm-up through the same loop).",
        default="hf",
    )
    num_workers: int = _help("Ray rollout actors; 0 runs the engine inside the trainer process.", default=1)
    group_size: int = _help("Responses per prompt (G).", default=4)
    max_new_tokens: int = _help("Generation length cap; longer responses are flagged truncated.", default=32)
    temperature: float = _help("Sampling temperature.", default=1.0)
    top_p: float = _help("Nucleus sampling threshold.", default=1.0)
    batch_size: int = _help("Prompts per generate call inside a worker.", default=64)
    threads_per_worker: int = _help("torch CPU threads of each rollout actor.", default=2)
    ray_address: str | None = _help("Ray cluster address; null starts a local Ray instance.", default=None)
    gpus_per_worker: float = _help("GPUs per rollout actor (Ray placement).", default=0.0)
    engine_args: dict[str, Any] = _help(
        "Extra keyword arguments of the engine (vLLM: tensor_parallel_size, gpu_memory_utilization, weight_sync, "
        "check_sync, enable_sleep_mode, ...; see docs/vllm.md).",
        default_factory=dict,
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
    weight: float = _help("Weight when several teachers serve one domain (normalised per sample).", default=1.0)
    topk: int = _help("Also return the teacher's top-k log-probs at every response position (0 = off).", default=0)
    backend: Literal["hf", "vllm"] = _help("Scoring engine.", default="hf")
    num_workers: int = _help("Ray actors serving this teacher; 0 scores inside the trainer process.", default=1)
    threads_per_worker: int = _help("torch CPU threads of each teacher actor.", default=2)
    gpus_per_worker: float = _help("GPUs per teacher actor (Ray placement).", default=0.0)
    batch_size: int = _help("Sequences per teacher forward pass.", default=64)
    template_kwargs: dict[str, Any] = _help("Extra chat-template arguments of this teacher.", default_factory=dict)
    engine_args: dict[str, Any] = _help("Extra keyword arguments of the teacher backend (vLLM settings).", default_factory=dict)


@dataclass
class AlgorithmConfig:
    advantage: str = _help("Registered advantage estimator: mopd, gspo, grpo, sft, ...", default="mopd")
    policy_loss: str = _help("Registered policy loss: gspo, gspo_token, grpo, nll, ...", default="gspo_token")
    clip_low: float = _help("Ratio clip: lower bound is 1 - clip_low.", default=0.2)
    clip_high: float = _help("Ratio clip: upper bound is 1 + clip_high.", default=0.28)
    loss_agg: Literal["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"] = _help(
        "Loss aggregation (default: each sequence's length-normalised mean, then the mean over sequences).",
        default="seq_mean_token_mean",
    )
    norm_std: bool = _help("Divide group-centred rewards by the group std.", default=True)
    outcome_weight: float = _help("MOPD: weight of the added group-normalised outcome advantage (0 = off).", default=0.0)
    mopd_token_weight: float = _help(
        "MOPD: weight of the sampled-token reverse-KL advantage (0 = only the dense logit losses teach).", default=1.0
    )
    mopd_topk: int = _help("MOPD: keep only tokens inside both teacher and student top-k (0 = off).", default=0)
    mopd_adv_clip: float = _help("MOPD: clip per-token advantages to [-c, c] (0 = off).", default=0.0)
    mopd_baseline: Literal["none", "group"] = _help(
        "MOPD: 'group' subtracts the leave-one-out mean advantage of the prompt's other responses per position.",
        default="none",
    )
    logit_losses: dict[str, float] = _help(
        "Registered logit losses added to the policy loss with a weight, e.g. {teacher_kl: 1.0}: MOPD's reverse KL "
        "over each routed teacher's top-k tokens plus a tail bucket (needs teachers[].topk > 0).",
        default_factory=dict,
    )
    mismatch: Literal["none", "tis", "mask"] = _help(
        "Sampler/trainer log-prob mismatch: 'tis' weights tokens by min(pi_old/pi_sampler, mismatch_cap); "
        "'mask' drops tokens whose ratio leaves [mismatch_low, mismatch_high] (MiMo-V2-Flash).",
        default="tis",
    )
    mismatch_cap: float = _help("Truncation C of the TIS weight.", default=2.0)
    mismatch_low: float = _help("'mask' rule: lowest kept pi_old/pi_sampler.", default=0.5)
    mismatch_high: float = _help("'mask' rule: highest kept pi_old/pi_sampler.", default=2.0)
    kl_coef: float = _help("KL penalty to the reference (initial) model (k3 estimator); 0 = off.", default=0.0)
    entropy_coef: float = _help("Entropy bonus (entropy is always logged).", default=0.0)
    truncated: Literal["keep", "drop", "downweight"] = _help("What truncated responses count for.", default="keep")
    truncated_weight: float = _help("Loss weight of truncated responses under 'downweight'.", default=0.5)
    filter_zero_variance_groups: bool = _help("Drop groups whose rewards are all equal from the loss.", default=False)
    updates_per_step: int = _help("Optimizer updates per rollout batch (mini-batches, one pass).", default=1)


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
    num_workers: int = _help("Reward worker processes (0 = in the trainer process, no timeouts).", default=2)
    timeout_s: float = _help("Per-call time limit of a reward function.", default=10.0)
    on_error: Literal["raise", "zero"] = _help(
        "A reward function that raises / returns garbage / times out: stop with a named error, or give 0 and count.",
        default="raise",
    )


@dataclass
class OptimConfig:
    lr: float = _help("AdamW learning rate.", default=1e-4)
    weight_decay: float = _help("AdamW weight decay.", default=0.0)
    betas: list[float] = _help("AdamW betas.", default_factory=lambda: [0.9, 0.999])
    grad_clip: float = _help("Global gradient-norm clip (0 = off).", default=1.0)
    warmup_steps: int = _help("Linear warm-up steps.", default=0)
    schedule: Literal["constant", "cosine"] = _help("Learning-rate schedule after warm-up.", default="constant")


@dataclass
class TrainerConfig:
    steps: int = _help("Training steps (one rollout batch each).", default=100)
    micro_batch_size: int = _help("Sequences per forward/backward (gradient accumulation).", default=64)
    checkpoint_every: int = _help("Checkpoint every N steps (and always at the end); 0 = only at the end.", default=50)
    keep_checkpoints: int = _help("Checkpoints kept (oldest deleted); 0 = keep all.", default=2)
    eval_every: int = _help("Held-out evaluation every N steps (and at start and end); 0 = only start and end.", default=0)
    eval_at_start: bool = _help("Evaluate the starting model (the 'before' column).", default=True)
    eval_teachers: bool = _help("Also evaluate each teacher on its routed domains, in its own view.", default=False)
    threads: int = _help("torch CPU threads of the trainer process (0 = torch's default).", default=0)
    device: Literal["auto", "cpu", "cuda"] = _help(
        "Where the student trains: 'auto' is CUDA when torch sees a GPU, else the CPU.", default="auto")
    precision: Literal["auto", "float32", "bf16_mixed"] = _help(
        "Training precision: 'bf16_mixed' computes in bf16 over fp32 master weights, optimizer state and fp32 "
        "gradient reduction (FSDP2's mixed precision); 'auto' is bf16_mixed on CUDA and float32 on the CPU.",
        default="auto")
    world_size: int = _help("Training ranks (FSDP2 shards the student over them; across nodes with Ray).", default=1)
    launcher: Literal["auto", "local", "torchrun", "ray"] = _help(
        "How training ranks start: 'torchrun' (`torchrun --nproc-per-node N -m cli train ...`, no Ray), 'ray' "
        "(actors in the placement plan's bundles), 'local' (one rank in-process); 'auto' is torchrun inside a "
        "torchrun job, ray for world_size > 1, else local.", default="auto")
    gpus_per_rank: float = _help("GPUs per training rank in the placement plan (CUDA training).", default=1.0)
    activation_checkpointing: Literal["auto", "on", "off"] = _help(
        "Recompute each decoder layer's activations in the backward pass; 'auto' is on for CUDA.", default="auto")
    offload: Literal["none", "cpu"] = _help(
        "FSDP2 CPU offload of parameters, gradients and optimizer state (few GPUs, large student).", default="none")
    collective_timeout_s: float = _help(
        "A collective that waits longer than this fails (a dead or stuck rank stops the job, not hangs it).",
        default=900.0)
    logprob_chunk_rows: int = _help(
        "Token rows per chunk of the hidden-state log-prob pass (0 = sized from a memory budget).", default=0)
    weight_sync_mb: float = _help("Size of the weight buckets streamed from the shards to the engines.", default=512.0)


@dataclass
class EvalConfig:
    max_new_tokens: int = _help("Generation cap in evaluation.", default=48)
    batch_size: int = _help("Prompts per generate call in evaluation.", default=64)
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
        names = [t.name for t in self.teachers]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"teachers: duplicate teacher names {duplicates}")
        if self.algorithm.advantage == "mopd" and not self.teachers:
            raise ValueError("algorithm.advantage is 'mopd' but no teachers are configured")
        if self.rollout.group_size < 1:
            raise ValueError("rollout.group_size must be >= 1")
        if self.trainer.world_size < 1:
            raise ValueError("trainer.world_size must be >= 1")
        if self.model.lora.enabled and self.trainer.world_size > 1:
            raise ValueError("model.lora with trainer.world_size > 1 is not supported: LoRA trains on one rank")
        if self.trainer.precision == "bf16_mixed" and self.model.dtype != "float32":
            raise ValueError("trainer.precision 'bf16_mixed' keeps fp32 master weights: set model.dtype to float32 "
                             f"(got {self.model.dtype!r})")

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) / self.run.name


def load_config(path: str | Path, overrides: list[str] | None = None) -> tuple[JobConfig, dict]:
    """Read, compose, override and validate a job file. Returns (typed config, resolved plain dict)."""
    data, provenance = load_yaml_tree(path)
    provenance.setdefault("", str(path))
    data = apply_overrides(data, list(overrides or []), provenance)
    cfg = build_dataclass(JobConfig, data, provenance)
    return cfg, to_dict(cfg)
