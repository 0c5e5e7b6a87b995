"""The policy worker: the only code that holds the student, its optimizer and its shards (one training rank).

Every rank builds the same `PolicyWorker`; with `world_size > 1` they form one `torch.distributed` group (gloo on
CPU, NCCL on GPU) and FSDP2 shards each decoder layer, the vision tower and the root. Each rank computes pi_old and
the update on its token-balanced share of a step's sequences; losses are normalised by the whole step's units, so
the ranks' gradients sum to the one-rank gradient of the same global batch. The controller reaches the ranks only
through a worker group (`rl.worker_group`), whichever launcher started them.

Interface (each method runs on every rank, collectively):
    logprobs(rollouts)       -> PiOld of this rank's rows (pi_old, student top-k, reference log-probs)
    update(rollouts, step)   -> metrics (already reduced over ranks)
    weight_buckets(max_mb)   -> full tensors, gathered bucket by bucket (rank 0 yields them, others only gather)
    save(folder) / load(folder), export_hf(folder)
"""

from __future__ import annotations

import os
import socket
import warnings
from contextlib import contextmanager
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from models.batching import pack
from models.checkpointing import checkpointing_mode, enable_checkpointing
from models.dsa import is_dsa_model
from models.fused_rms_norm import use_fused_rms_norm
from models.moe_experts import use_permute_experts
from models.packing import budget_batches, pack_shared, resolve_attention, set_attention
from models.policy_head import LogprobModel, ResponseLogprobs, decoder_layers
from rl.algorithms import (
    aggregate_token_loss,
    get_logit_loss,
    get_policy_loss,
    k3_kl,
    loss_units,
    masked_mean,
    per_sequence_weights,
)
from rl.microbatch import micro_batches, partition_by_tokens, resolve_packing, shared_prompt_units
from rl.rollouts import Rollouts
from rl.schedule import lr_factor, schedule_for


@dataclass
class PiOld:
    """pi_old of some rows of a step (CPU tensors): `old [n, T]`, `topk_ids [n, T, k]`, `ref [n, T]`."""

    rows: list[int]
    old: torch.Tensor
    topk_ids: torch.Tensor | None
    ref: torch.Tensor | None


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`trainer.device`: 'auto' is CUDA when available; a CUDA rank takes GPU `local_rank` of its host."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.device is 'cuda' but torch sees no CUDA device")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(name)


def mixed_precision(precision: str, device: torch.device) -> bool:
    """`trainer.precision`: 'auto' trains in bf16 compute over fp32 master weights on CUDA, float32 on CPU."""
    return precision == "bf16_mixed" or (precision == "auto" and device.type == "cuda")


class PolicyWorker:
    def __init__(self, cfg, rank: int = 0, world_size: int = 1, local_rank: int | None = None):
        from rl.student import build_student, resolve_tokenizer

        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device = resolve_device(cfg.trainer.device, rank if local_rank is None else local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if cfg.trainer.threads:
            torch.set_num_threads(cfg.trainer.threads)
        torch.manual_seed(cfg.run.seed)
        self.tokenizer = resolve_tokenizer(cfg)
        self.sharded = world_size > 1
        init_device = self.device if cfg.trainer.offload == "none" else None
        source = None  # rank 0's loaded student when the ranks start from a skeleton
        if self.sharded and cfg.model.path is not None:
            from rl.student import student_skeleton

            lm = student_skeleton(cfg)
            source = build_student(cfg, self.tokenizer)[0] if rank == 0 else None
        else:
            lm = build_student(cfg, self.tokenizer, device=init_device)[0]
        self.lm = lm
        set_attention(lm, resolve_attention(cfg.model.attention, self.device, self._shared_prompt(), is_dsa_model(lm)))
        use_permute_experts(lm)  # MoE token permutations' backward as gathers, not scatter-adds
        use_fused_rms_norm(lm)  # one kernel per norm and direction on CUDA
        self.mixed = mixed_precision(cfg.trainer.precision, self.device)
        enable_checkpointing(lm, checkpointing_mode(cfg.trainer.activation_checkpointing, self.device))
        self.module = LogprobModel(lm, cfg.model.dsa.stage)
        self.reference = self._reference() if cfg.algorithm.kl_coef > 0 else None
        if self.sharded or self.mixed or cfg.trainer.offload != "none":
            self._shard(self.module)
            if self.reference is not None:
                self._shard(self.reference)
            if any(p.is_meta for p in lm.parameters()):
                self._materialize(self.module, source)
                if self.reference is not None:
                    self._materialize(self.reference, source)
            del source
        else:
            self.module.to(self.device)
            if self.reference is not None:
                self.reference.to(self.device)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = self._optimizer()
        total, warm, schedule = schedule_for(cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda update: lr_factor(update, total, warm, schedule))
        self.policy_loss = get_policy_loss(cfg.algorithm.policy_loss)
        self.logit_losses = {name: (get_logit_loss(name), float(w)) for name, w in cfg.algorithm.logit_losses.items()}

    # ------------------------------------------------------------------ placement

    def _reference(self) -> LogprobModel:
        """The initial student, frozen (KL penalty), built like the student so it shards the same way."""
        from rl.student import build_student, student_skeleton

        if self.sharded and self.cfg.model.path is not None:
            ref = student_skeleton(self.cfg)
        else:
            ref, _ = build_student(self.cfg, self.tokenizer,
                                   device=self.device if self.cfg.trainer.offload == "none" else None)
        for p in ref.parameters():
            p.requires_grad_(False)
        return LogprobModel(ref.eval())

    def _shard(self, module: LogprobModel) -> None:
        """FSDP2: each decoder layer, then the root (embedding, final norm, lm_head and the frozen vision tower).
        The tower stays in the root unit: a micro-batch without video never calls it, and a unit of its own would
        then all-gather on some ranks only. It is frozen, so it gets no gradient and no optimizer state; sharded,
        its fp32 weights stay bit-identical. Mixed precision computes in bf16 over fp32 master weights and
        reduces gradients in fp32."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        if not dist.is_initialized():  # one rank on a GPU: a group of one, so mixed precision is FSDP2's too
            init_single_rank_group(self.device)
            self.owns_group = True
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self.mixed else (
            MixedPrecisionPolicy())
        offload = CPUOffloadPolicy() if self.cfg.trainer.offload == "cpu" else OffloadPolicy()
        if self.cfg.trainer.offload == "none" and not any(p.is_meta for p in module.parameters()):
            module.to(self.device)  # a skeleton gets its storage after sharding (`_materialize`)
        kwargs = dict(mesh=mesh, mp_policy=mp, offload_policy=offload)
        for layer in decoder_layers(module.lm):
            fully_shard(layer, **kwargs)
        fully_shard(module, **kwargs)

    def _materialize(self, module: LogprobModel, source) -> None:
        """Give a sharded skeleton its weights: storage for each rank's shards, then rank 0's loaded student
        broadcast shard by shard (`source`, None on the other ranks), then every buffer (rotary tables are
        not in the state dict) from rank 0."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        module.to_empty(device=self.device if self.cfg.trainer.offload == "none" else "cpu")
        full = {f"lm.{k}": v for k, v in source.state_dict().items()} if source is not None else {}
        set_model_state_dict(module, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        own = dict(source.named_buffers()) if source is not None else {}
        for name, buffer in module.lm.named_buffers():
            if source is not None:
                buffer.copy_(own[name])
            dist.broadcast(buffer, src=0)

    def _optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        # fused: one kernel per parameter instead of a pass per Adam term (8x faster on CPU over a 151k-token
        # vocabulary's embedding and lm_head); sharded CPU parameters take the foreach path
        fused = self.device.type == "cuda" or not self.sharded
        return torch.optim.AdamW(self.params, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas),
                                 fused=fused or None)

    # ------------------------------------------------------------------ rows of a step

    def _shared_prompt(self) -> bool:
        """`trainer.packing` resolves to shared-prompt packing (one prompt copy per group per forward)."""
        return resolve_packing(self.cfg) == "shared_prompt"

    def _my_units(self, rollouts: Rollouts) -> tuple[list[list[int]], list[int]]:
        """Packing: this rank's groups (rows sharing a group id and an identical prompt) and their packed
        tokens; groups are balanced over ranks by those tokens and never split."""
        lengths = rollouts.response_mask.sum(-1).long().tolist()
        units, tokens = shared_prompt_units(rollouts.prompts, rollouts.group_ids.tolist(), lengths)
        mine = partition_by_tokens(tokens, self.world_size)[self.rank]
        return [units[u] for u in mine], [tokens[u] for u in mine]

    def _my_rows(self, rollouts: Rollouts) -> list[int]:
        if self._shared_prompt():
            return sorted(r for unit in self._my_units(rollouts)[0] for r in unit)
        return partition_by_tokens(_lengths(rollouts), self.world_size)[self.rank]

    def _my_micro_batches(self, rollouts: Rollouts) -> list[list[int] | None]:
        """This rank's micro-batches; None entries are zero-weight repeats that keep ranks in step. Packing:
        whole groups per micro-batch, up to micro_batch_tokens packed tokens and micro_batch_size rows."""
        t = self.cfg.trainer
        if self._shared_prompt():
            units, tokens = self._my_units(rollouts)
            groups: list[list[int] | None] = budget_batches(units, tokens, t.micro_batch_tokens, t.micro_batch_size)
        else:
            groups = micro_batches(self._my_rows(rollouts), _lengths(rollouts), t.micro_batch_size)
        count = self._max_over_ranks(len(groups))
        return groups + [None] * (count - len(groups))

    def _forward(self, module: LogprobModel, micro: Rollouts, *, teacher_ids: bool, topk: int = 0,
                 entropy_grad: bool = False) -> tuple[ResponseLogprobs, dict[str, int]]:
        """One forward (shared-prompt packed or padded, per `trainer.packing`); column 0 of the log-probs is the
        sampled token, then each routed teacher's top-k ids (`spans`: teacher -> first column) when a dense logit
        loss reads them."""
        responses = [micro.response_ids[i, : int(micro.response_mask[i].sum())].tolist() for i in range(len(micro))]
        t_len = micro.response_ids.shape[1]
        if self._shared_prompt():
            batch = pack_shared(micro.prompts, responses, micro.group_ids.tolist(), response_len=t_len)
        else:
            batch = pack(micro.prompts, responses, self.tokenizer.pad_token_id, response_len=t_len)
        batch = batch.to(self.device)
        columns, spans, start = [micro.response_ids.unsqueeze(-1)], {}, 1
        if teacher_ids:
            for name, ids in micro.teacher_topk_ids.items():
                columns.append(ids)
                spans[name] = start
                start += ids.shape[-1]
        ids = torch.cat(columns, dim=-1).to(self.device)
        out = module(batch, ids, topk=topk, entropy_grad=entropy_grad, chunk_rows=self.cfg.trainer.logprob_chunk_rows or None)
        return out, spans

    # ------------------------------------------------------------------ pi_old

    @torch.no_grad()
    def logprobs(self, rollouts: Rollouts) -> PiOld:
        """pi_old of this rank's rows (the student before the update), its top-k ids when MOPD filters by them,
        and the reference model's log-probs under a KL penalty."""
        rollouts = rollouts.to(self.device)
        topk = self.cfg.algorithm.mopd_topk
        rows = self._my_rows(rollouts)
        position = {r: i for i, r in enumerate(rows)}
        b, t_len = len(rows), rollouts.response_ids.shape[1]
        old = torch.zeros(b, t_len)
        ref = torch.zeros(b, t_len) if self.reference is not None else None
        top = torch.zeros(b, t_len, topk, dtype=torch.long) if topk else None
        self.module.eval()
        for idx in self._my_micro_batches(rollouts):
            micro = rollouts.select(idx if idx is not None else [0])
            out, _ = self._forward(self.module, micro, teacher_ids=False, topk=topk)
            if self.reference is not None:
                ref_out, _ = self._forward(self.reference, micro, teacher_ids=False)
            if idx is None:
                continue
            at = [position[r] for r in idx]
            old[at] = out.logprobs[..., 0].cpu()
            if top is not None:
                top[at] = out.topk_ids.cpu()
            if ref is not None:
                ref[at] = ref_out.logprobs[..., 0].cpu()
        self.module.train()
        return PiOld(rows, old, top, ref)

    # ------------------------------------------------------------------ the update

    def update(self, rollouts: Rollouts, step: int) -> dict[str, float]:
        """`updates_per_step` optimizer steps over disjoint mini-batches (seeded by step), each accumulated over
        micro-batches with one gradient reduction at the last."""
        alg = self.cfg.algorithm
        rollouts = rollouts.to(self.device)
        self.module.train()
        order = torch.randperm(len(rollouts), generator=torch.Generator().manual_seed(self.cfg.run.seed + step))
        minis = order.chunk(alg.updates_per_step)
        totals: dict[str, float] = {}
        for mini in minis:
            part = rollouts.select(mini)
            units = {  # what each term is a mean over, counted on the whole mini-batch (all ranks)
                "policy": loss_units(part.loss_mask, alg.loss_agg),
                "tokens": float(part.response_mask.sum()),
                "sequences": float(len(part)),
                "answered": loss_units(part.response_mask, "seq_mean_token_mean"),  # sequences with a token
            }
            self.optimizer.zero_grad(set_to_none=True)
            groups = self._my_micro_batches(part)
            for j, idx in enumerate(groups):
                self._gradient_sync(j == len(groups) - 1)
                micro = part.select(idx if idx is not None else [0])
                total, metrics = self._micro_loss(micro, units, weight=0.0 if idx is None else 1.0)
                # FSDP averages gradients over ranks; each rank's loss is its share of the global loss, so the
                # sum is wanted: scale by the world size.
                (total * self.world_size).backward()
                for k, v in metrics.items():
                    totals[k] = totals.get(k, 0.0) + v / len(minis)
            if self.cfg.optim.grad_clip:
                norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
                norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
                totals["actor/grad_norm"] = totals.get("actor/grad_norm", 0.0) + float(norm) / len(minis) / self.world_size
            self.optimizer.step()
            self.scheduler.step()
        return self._sum_over_ranks(totals)

    def _micro_loss(self, micro: Rollouts, units: dict[str, float], weight: float) -> tuple[torch.Tensor, dict[str, float]]:
        """Every term of one micro-batch, each weighted by this micro-batch's share of its own units, so the
        micro-batches of all ranks add up to the loss of the whole mini-batch. Metrics come weighted the same way."""
        alg = self.cfg.algorithm
        out, spans = self._forward(self.module, micro, teacher_ids=bool(self.logit_losses),
                                   entropy_grad=bool(alg.entropy_coef))
        logp = out.logprobs[..., 0]
        loss, metrics = self.policy_loss(logp, micro.old_logprobs, micro.advantages, micro.loss_mask, alg,
                                         weights=micro.token_weights)
        share = {
            "policy": weight * loss_units(micro.loss_mask, alg.loss_agg) / max(units["policy"], 1e-9),
            "tokens": weight * float(micro.response_mask.sum()) / max(units["tokens"], 1e-9),
            "sequences": weight * len(micro) / units["sequences"],
            "answered": weight * loss_units(micro.response_mask, "seq_mean_token_mean") / max(units["answered"], 1e-9),
        }
        entropy = masked_mean(out.entropy, micro.response_mask)
        total = loss * share["policy"]
        # each logged value is a mean over its own units, weighted like its loss term: sums over micro-batches
        # and ranks are then the whole mini-batch's means, however the rows were split
        logged = {k: v * share["policy"] for k, v in {**metrics, "actor/loss": float(loss.detach())}.items()}
        logit_mask, logit_share = micro.response_mask, share["tokens"]
        if alg.logit_loss_agg == "seq_mean_token_mean":
            # tokens weighted 1/length: the losses' masked token mean becomes the mean over sequences of each
            # sequence's token mean, and a micro-batch weighs its share of the mini-batch's answered sequences
            logit_mask, logit_share = per_sequence_weights(micro.response_mask), share["answered"]
        for fn, w in self.logit_losses.values():
            teacher = {n: out.logprobs[..., s : s + micro.teacher_topk_ids[n].shape[-1]] for n, s in spans.items()}
            extra, extra_metrics = fn(teacher, micro, logit_mask, alg)
            total = total + w * extra * logit_share
            logged.update({k: v * logit_share for k, v in extra_metrics.items()})
        if alg.entropy_coef:
            total = total - alg.entropy_coef * entropy * share["tokens"]
        if out.indexer_loss is not None:
            total = total + self.cfg.model.dsa.indexer_loss_weight * out.indexer_loss * share["sequences"]
            logged.update({f"dsa/{k}": v * share["sequences"] for k, v in out.indexer_metrics.items()})
        if self.reference is not None:
            kl = aggregate_token_loss(k3_kl(logp, micro.ref_logprobs), micro.loss_mask, alg.loss_agg)
            total = total + alg.kl_coef * kl * share["policy"]
            logged["actor/kl_ref"] = float(kl.detach()) * share["policy"]
        logged["actor/entropy"] = float(entropy.detach()) * share["tokens"]
        return total, logged

    def _gradient_sync(self, last: bool) -> None:
        """Accumulating micro-batches reduce gradients once, at the last one (FSDP2)."""
        if hasattr(self.module, "set_requires_gradient_sync"):
            self.module.set_requires_gradient_sync(last)

    # ------------------------------------------------------------------ collectives

    def _max_over_ranks(self, value: int) -> int:
        if not self.sharded:
            return value
        t = torch.tensor([value], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def _sum_over_ranks(self, metrics: dict[str, float]) -> dict[str, float]:
        if not self.sharded:
            return metrics
        parts: list[dict[str, float]] = [{} for _ in range(self.world_size)]
        dist.all_gather_object(parts, metrics)
        keys = sorted({k for p in parts for k in p})
        return {k: sum(p.get(k, 0.0) for p in parts) for k in keys}

    # ------------------------------------------------------------------ weights out

    def weight_buckets(self, max_mb: float = 512) -> Iterator[dict[str, torch.Tensor]]:
        """The student's weights in the plain model's names, as CPU tensors in buckets of about `max_mb`:
        sharded parameters are gathered one tensor at a time (every rank takes part; rank 0 yields), so no rank
        ever holds a second full copy of the model. LoRA adapters are merged into their base weights."""
        from rl.student import merged_state_items

        bucket: dict[str, torch.Tensor] = {}
        size = 0.0
        cuda = self.device.type == "cuda"
        for name, tensor in merged_state_items(self.lm):
            full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
            if self.rank != 0:
                continue
            if full.device.type == "cpu":
                bucket[name] = full.detach()  # a CPU tensor is not copied: the engines copy it in
            else:  # into pinned host memory, asynchronously (pageable copies ran at 1.6 GB/s on an H100)
                host = torch.empty(full.shape, dtype=full.dtype, pin_memory=True)
                bucket[name] = host.copy_(full.detach(), non_blocking=True)
            size += full.numel() * full.element_size() / 2**20
            if size >= max_mb:
                if cuda:
                    torch.cuda.current_stream(self.device).synchronize()  # the bucket's copies have landed
                yield bucket
                bucket, size = {}, 0.0
        if bucket and self.rank == 0:
            if cuda:
                torch.cuda.current_stream(self.device).synchronize()
            yield bucket

    def drain(self, method: str, *args: Any) -> None:
        """Run a generator method to the end without keeping what it yields (the ranks that only take part)."""
        for _ in getattr(self, method)(*args):
            pass

    # ------------------------------------------------------------------ checkpoints

    def save(self, folder: Path) -> None:
        """Model and optimizer shards through torch.distributed.checkpoint (any world size can load them)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        with _single_process_is_intended():
            dcp.save({"model": model_state, "optim": optim_state, "scheduler": self.scheduler.state_dict()},
                     checkpoint_id=str(Path(folder) / "dcp"))

    def load(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        state = {"model": model_state, "optim": optim_state, "scheduler": self.scheduler.state_dict()}
        with _single_process_is_intended():
            dcp.load(state, checkpoint_id=str(Path(folder) / "dcp"))
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.scheduler.load_state_dict(state["scheduler"])

    def export_hf(self, folder: Path) -> None:
        """A consolidated Hugging Face folder (safetensors, merged LoRA) that transformers, vLLM and `vlpost eval`
        load; written by rank 0 from weights gathered tensor by tensor."""
        from rl.student import save_student

        if not self.sharded and not self.mixed and self.cfg.trainer.offload == "none":
            save_student(self.lm, self.tokenizer, Path(folder))
            return
        state: dict[str, torch.Tensor] = {}
        for bucket in self.weight_buckets():
            state.update(bucket)
        if self.rank == 0:
            from models.factory import save_model

            save_model(self.lm, self.tokenizer, Path(folder), state_dict=state)

    # ------------------------------------------------------------------ what tests and the controller inspect

    def close(self) -> None:
        """Close the one-rank group this worker opened (a torchrun or Ray group is its launcher's to close)."""
        if getattr(self, "owns_group", False) and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False

    def optimizer_state_names(self) -> list[str]:
        """Names of the parameters that carry optimizer state (frozen ones must not)."""
        ids = {id(p) for p in self.optimizer.state}
        return [n for n, p in self.module.named_parameters() if id(p) in ids]

    def describe(self) -> dict[str, Any]:
        return {"rank": self.rank, "host": socket.gethostname(), "pid": os.getpid(), "device": str(self.device),
                "sharded": self.sharded, "mixed_precision": self.mixed}


@contextmanager
def _single_process_is_intended():
    """One rank without a process group saves and loads DCP checkpoints in-process: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def init_single_rank_group(device: torch.device) -> None:
    """A one-rank process group (FSDP2 needs one even on a single GPU), on a free local port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)


def _lengths(rollouts: Rollouts) -> list[int]:
    masks = rollouts.response_mask.sum(-1).tolist()
    return [len(p.input_ids) + int(m) for p, m in zip(rollouts.prompts, masks)]
