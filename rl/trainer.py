"""The one training loop. MOPD, GSPO Context-RL / Video-RL and supervised warm-up differ only in the
registered advantage estimator, policy loss and rewards named in the config.

    samples   = stream.next_batch()                        prompts (G copies each)
    rollouts  = rollout_pool.generate(...)                  sampled responses + sampler log-probs
    rollouts.rewards          = reward_scorer.score(...)
    rollouts.teacher_logprobs = teacher_pools[k].score(...) routed by domain / modality, in each teacher's view
    rollouts.old_logprobs     = student(no grad)            pi_old, the trainer's numbers
    rollouts.advantages       = estimator(...)              "mopd", "gspo", "grpo", "sft", ...
    loss = policy_loss(logp, old_logp, advantages, mask)    "gspo", "gspo_token", "grpo", "nll", ...
    optimizer step -> checkpoint (atomic) -> sync weights to the rollout engines -> eval every N steps
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from models.batching import pack, response_logits, token_logprobs
from models.chat import ChatRenderer
from models.factory import quiet_libraries, vision_layout
from rewards.inputs import RewardTrainerState, reward_requests
from rewards.scorer import RewardScorer
from rl.algorithms import aggregate_token_loss, get_advantage_estimator, get_logit_loss, get_policy_loss, masked_mean
from rl.checkpoint import latest_checkpoint, load_trainer_state, rng_state, save_checkpoint, set_rng_state
from rl.config import JobConfig
from rl.data import PromptStream, load_tasks
from rl.evaluation import evaluate_samples, prepare_eval_samples, video_options
from rl.logger import MetricsLogger
from rl.rollouts import Rollouts
from tasks.prefetch import PrefetchingStream
from rl.student import build_student, resolve_tokenizer, save_student, student_state_dict
from rollout.actors import ActorPool
from rollout.base import SamplingSettings
from rollout.worker import combine_generations
from teachers.backends import teacher_backend_target
from teachers.base import combine_scores
from teachers.routing import Route, TeacherRouter


class Trainer:
    def __init__(self, cfg: JobConfig, resolved: dict[str, Any] | None = None):
        quiet_libraries()
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(resolved or {}, sort_keys=False))
        if cfg.trainer.threads:
            torch.set_num_threads(cfg.trainer.threads)
        self._seed_everything(cfg.run.seed)
        self.tokenizer = resolve_tokenizer(cfg)
        self.model, self.frozen = build_student(cfg, self.tokenizer)
        self.renderer = ChatRenderer(self.tokenizer, vision_layout(self.model), cfg.model.template_kwargs)
        self.train_samples = load_tasks(cfg.data.train, cfg.run.seed, weighted=True)
        self.eval_samples = load_tasks(cfg.data.eval, cfg.run.seed)
        self.stream = self._prompt_stream()
        self.scorer = RewardScorer.from_config(cfg.rewards)
        self._check_reward_routes()
        self.estimator = get_advantage_estimator(cfg.algorithm.advantage)
        self.policy_loss = get_policy_loss(cfg.algorithm.policy_loss)
        self.logit_losses = {name: (get_logit_loss(name), float(w)) for name, w in cfg.algorithm.logit_losses.items()}
        params = [p for p in self.model.parameters() if p.requires_grad]
        # fused: one kernel per parameter instead of a pass per Adam term (CPU: 8x faster over a 151k-token
        # vocabulary's embedding and lm_head, ~0.2 s a step at 39 M parameters)
        self.optimizer = torch.optim.AdamW(
            params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=tuple(cfg.optim.betas),
            fused=all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params) or None,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.step = 0
        self.eval_history: list[dict[str, Any]] = []
        resumed = self._maybe_resume()
        if not resumed:
            self._save(0)  # step 0: the starting model, what rollout engines load and "before" compares to
        self.reference = self._reference_model() if cfg.algorithm.kl_coef > 0 else None
        self.router, self.teacher_pools = self._start_teachers()
        self.rollout_pool = self._start_rollouts()
        self.teacher_eval: dict[str, Any] = {}

    # ------------------------------------------------------------------ setup helpers

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _prompt_stream(self) -> PrefetchingStream:
        """Training prompts in seeded order, with videos decoded by background workers ahead of the trainer;
        held-out videos are decoded once here. Unusable videos are skipped, counted and reported."""
        d = self.cfg.data
        layout = vision_layout(self.model)
        video = video_options(d, layout)
        self.eval_samples = prepare_eval_samples(self.eval_samples, d, layout)
        return PrefetchingStream(PromptStream(self.train_samples, self.cfg.run.seed), workers=d.decode_workers,
                                 prefetch_batches=d.prefetch_batches, **video)

    def _lr_factor(self, step: int) -> float:
        warm = self.cfg.optim.warmup_steps
        if warm and step < warm:
            return (step + 1) / warm
        if self.cfg.optim.schedule == "cosine":
            span = max(1, self.cfg.trainer.steps - warm)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / span)))
        return 1.0

    def _check_reward_routes(self) -> None:
        domains = sorted({s.domain for s in self.train_samples + self.eval_samples})
        missing = [d for d in domains if d not in self.cfg.rewards.routes and not any(
            s.reward for s in self.train_samples if s.domain == d)]
        if missing:
            raise ValueError(f"rewards.routes: no reward for domain(s) {missing}; routes: {list(self.cfg.rewards.routes)}")

    def _maybe_resume(self) -> bool:
        if not self.cfg.run.resume:
            return False
        folder = latest_checkpoint(self.run_dir)
        if folder is None:
            return False
        state = load_trainer_state(folder)
        if hasattr(self.model, "peft_config"):
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.model, state["adapter"])
        else:
            from models.factory import load_model

            self.model.load_state_dict(load_model(folder).state_dict())
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.stream.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        self.step = state["step"]
        self.eval_history = state.get("eval_history", [])
        print(f"resumed {self.run_dir} from {folder.name} (step {self.step})", flush=True)
        return True

    def _reference_model(self):
        from models.factory import load_model

        ref = load_model(self.run_dir / "checkpoints" / "step_000000").eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

    def _start_rollouts(self) -> ActorPool:
        r = self.cfg.rollout
        from rl.checkpoint import latest_checkpoint as latest

        kwargs = {"model_path": str(latest(self.run_dir)), "batch_size": r.batch_size, **r.engine_args}
        return ActorPool(
            "rollout", "rollout.worker:RolloutWorker", {"backend": r.backend, "engine_kwargs": kwargs},
            num_workers=r.num_workers, threads=r.threads_per_worker, gpus_per_worker=r.gpus_per_worker,
            ray_address=r.ray_address,
        )

    def _start_teachers(self) -> tuple[TeacherRouter | None, dict[str, ActorPool]]:
        if not self.cfg.teachers:
            return None, {}
        routes, pools = [], {}
        for t in self.cfg.teachers:
            if not Path(t.path).exists():
                raise FileNotFoundError(f"teachers.{t.name}.path: {t.path} not found")
            routes.append(Route(t.name, tuple(t.domains), tuple(t.modalities), t.weight))
            kwargs = {"name": t.name, "path": t.path, "view": t.view, "topk": t.topk, "batch_size": t.batch_size,
                      "template_kwargs": t.template_kwargs, **t.engine_args}
            pools[t.name] = ActorPool(
                f"teacher {t.name}", teacher_backend_target(t.backend), kwargs, num_workers=t.num_workers,
                threads=t.threads_per_worker, gpus_per_worker=t.gpus_per_worker, ray_address=self.cfg.rollout.ray_address,
            )
        router = TeacherRouter(routes)
        domains = sorted({s.domain for s in self.train_samples})
        if router.uncovered(domains):
            raise ValueError(f"teachers: no teacher serves domain(s) {router.uncovered(domains)}")
        self._check_teacher_vocab()
        return router, pools

    def _check_teacher_vocab(self) -> None:
        from models.factory import load_tokenizer

        mine = hash(tuple(sorted(self.tokenizer.get_vocab().items())))
        for t in self.cfg.teachers:
            theirs = hash(tuple(sorted(load_tokenizer(t.path).get_vocab().items())))
            if theirs != mine:
                raise ValueError(
                    f"teacher {t.name!r} ({t.path}) has a different vocabulary from the student: token-level "
                    "distillation needs shared token ids"
                )

    # ------------------------------------------------------------------ the loop

    def fit(self) -> None:
        cfg = self.cfg
        logger = MetricsLogger(
            self.run_dir, cfg.trainer.steps, self.step, progress=cfg.logging.progress,
            tensorboard=cfg.logging.tensorboard, wandb=cfg.logging.wandb, wandb_project=cfg.logging.wandb_project,
            desc=cfg.run.name,
        )
        try:
            if self.step == 0 and cfg.trainer.eval_at_start and not self._evaluated(0):
                self.evaluate(0)
            while self.step < cfg.trainer.steps:
                metrics = self.train_step()
                self.step += 1
                logger.log(self.step, metrics)
                logger.progress(metrics)
                last = self.step == cfg.trainer.steps
                every, ev = cfg.trainer.checkpoint_every, cfg.trainer.eval_every
                due_eval = last or bool(ev and self.step % ev == 0)
                if due_eval:
                    self.evaluate(self.step)
                if due_eval or (every and self.step % every == 0):
                    self._save(self.step)  # an evaluated step is saved too, so its result is in the resumable state
        finally:
            logger.close()
        if not self._evaluated(self.step):
            self.evaluate(self.step)
        self.write_summary()
        self._link_final()

    def _link_final(self) -> None:
        """`<run>/final` -> the last checkpoint: a stable path for the next stage (teachers, base student)."""
        last = latest_checkpoint(self.run_dir)
        link = self.run_dir / "final"
        tmp = self.run_dir / ".final.tmp"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(Path("checkpoints") / last.name)
        tmp.replace(link)

    def train_step(self) -> dict[str, float]:
        cfg, alg = self.cfg, self.cfg.algorithm
        t0 = time.perf_counter()
        prompts_samples = self.stream.next_batch(cfg.data.prompts_per_step)
        g = cfg.rollout.group_size
        samples = [s for s in prompts_samples for _ in range(g)]
        group_ids = torch.arange(len(prompts_samples)).repeat_interleave(g)
        rendered = [self.renderer.render(s.messages, s.tools) for s in samples]
        targets = [self.renderer.encode_response(s.target) if s.target else None for s in samples]
        settings = SamplingSettings(
            max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
            seed=cfg.run.seed * 1_000_003 + self.step, suppress_token_ids=self.renderer.placeholder_ids,
        )
        gens = self.rollout_pool.map(
            "generate", rendered, targets, settings=settings, combine=combine_generations,
            describe=lambda shard: f"{len(shard)} prompts",
        )
        t_gen = time.perf_counter()
        rollouts = self._to_rollouts(samples, rendered, group_ids, gens)
        self._score_rewards(rollouts)
        t_reward = time.perf_counter()
        self._score_teachers(rollouts)
        t_teacher = time.perf_counter()
        fused = None
        if self._needs_old_logprobs():
            fused = self._fused_forward(rollouts)
            if fused is None:
                self._old_logprobs(rollouts)
        self._build_loss_mask(rollouts)
        rollouts.advantages = self.estimator(
            rollouts.rewards, rollouts.group_ids, rollouts.loss_mask, alg, rollouts=rollouts
        )
        update_metrics = self._update(rollouts, fused)
        t_update = time.perf_counter()
        self.rollout_pool.broadcast("load_weights", student_state_dict(self.model), what="syncing weights")
        t_sync = time.perf_counter()
        metrics = {**rollouts.metrics, **update_metrics}
        metrics.update(self._rollout_metrics(rollouts))
        metrics.update(self.stream.metrics())
        metrics.update({
            "time/generate_s": t_gen - t0, "time/reward_s": t_reward - t_gen, "time/teachers_s": t_teacher - t_reward,
            "time/update_s": t_update - t_teacher, "time/sync_s": t_sync - t_update, "time/step_s": t_sync - t0,
            "perf/generated_tokens": float(rollouts.response_mask.sum()),
            "optim/lr": self.scheduler.get_last_lr()[0],
        })
        return metrics

    # ------------------------------------------------------------------ stages

    def _to_rollouts(self, samples, rendered, group_ids, gens) -> Rollouts:
        b = len(samples)
        t_len = max(1, max(len(r) for r in gens.response_ids))
        ids = torch.full((b, t_len), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(b, t_len)
        sampler_lp = torch.zeros(b, t_len)
        for i, (r, lp) in enumerate(zip(gens.response_ids, gens.logprobs)):
            if r:
                ids[i, : len(r)] = torch.tensor(r)
                mask[i, : len(r)] = 1
                sampler_lp[i, : len(r)] = torch.tensor(lp)
        completions = [self.renderer.decode_response(r) for r in gens.response_ids]
        return Rollouts(
            samples=samples, prompts=rendered, group_ids=group_ids, response_ids=ids, response_mask=mask,
            sampler_logprobs=sampler_lp, truncated=torch.tensor(gens.truncated, dtype=torch.bool), completions=completions,
        )

    def _score_rewards(self, rollouts: Rollouts) -> None:
        requests = reward_requests(rollouts.samples, rollouts.completions,
                                   _unpadded_responses(rollouts, range(len(rollouts))))
        result = self.scorer.score(requests, trainer_state=RewardTrainerState(self.step, self.cfg.trainer.steps))
        rollouts.rewards = torch.as_tensor(result.rewards, dtype=torch.float32)
        rollouts.reward_invalid = torch.as_tensor(result.invalid, dtype=torch.bool)
        rollouts.metrics.update(result.metrics())

    def _score_teachers(self, rollouts: Rollouts) -> None:
        if self.router is None:
            return
        weights = self.router.route(rollouts.samples)
        responses = _unpadded_responses(rollouts, range(len(rollouts)))
        b, t_len = rollouts.response_ids.shape
        for name, w in weights.items():
            idx = torch.nonzero(w > 0).flatten().tolist()
            rollouts.teacher_weights[name] = w
            full = torch.zeros(b, t_len)
            rollouts.teacher_logprobs[name] = full
            if not idx:
                continue
            scores = self.teacher_pools[name].map(
                "score", [rollouts.samples[i] for i in idx], [responses[i] for i in idx], combine=combine_scores,
                describe=lambda shard: f"{len(shard)} samples (first: {shard[0].id})",
            )
            n = scores.logprobs.shape[1]
            full[idx, :n] = scores.logprobs[:, :t_len]
            if scores.topk_ids is not None:
                k = scores.topk_ids.shape[-1]
                ids = torch.zeros(b, t_len, k, dtype=torch.long)
                lps = torch.zeros(b, t_len, k)
                ids[idx, :n] = scores.topk_ids[:, :t_len]
                lps[idx, :n] = scores.topk_logprobs[:, :t_len]
                rollouts.teacher_topk_ids[name] = ids
                rollouts.teacher_topk_logprobs[name] = lps

    def _needs_old_logprobs(self) -> bool:
        """pi_old is needed by ratio losses, by MOPD (the student side of the KL), the mismatch correction and
        the KL penalty; supervised warm-up (nll on demonstrations) needs none of them."""
        alg = self.cfg.algorithm
        return (getattr(self.policy_loss, "uses_old_logprobs", True) or getattr(self.estimator, "uses_old_logprobs", False)
                or self.reference is not None or (alg.mismatch != "none" and self.cfg.rollout.backend != "reference"))

    def _old_logprobs(self, rollouts: Rollouts) -> None:
        """The separate no-grad pi_old pass, over length-grouped micro-batches."""
        self._record_pi_old(rollouts)

    def _record_pi_old(self, rollouts: Rollouts, update_forward=None) -> None:
        """pi_old (and the student's top-k when MOPD asks for it, and the reference model's log-probs): from a
        no-grad pass over length-grouped micro-batches, or from `update_forward = (batch, logits, logp)`, the
        update's own forward over the whole batch (`_fused_forward`)."""
        topk = self.cfg.algorithm.mopd_topk
        b, t_len = rollouts.response_ids.shape
        old = torch.zeros(b, t_len)
        ref = torch.zeros(b, t_len) if self.reference is not None else None
        topk_ids = torch.zeros(b, t_len, topk, dtype=torch.long) if topk else None
        groups = [list(range(b))] if update_forward is not None else self._micro_batches(rollouts)
        for idx in groups:  # results go back to their rows
            if update_forward is not None:
                batch, logits, logp = update_forward
            else:
                batch = self._pack(rollouts, idx)
                with torch.no_grad():
                    logits = response_logits(self.model, batch)
                    logp = token_logprobs(logits, rollouts.response_ids[idx])
            old[idx] = logp.detach()
            if topk:
                topk_ids[idx] = logits.detach().topk(topk, dim=-1).indices
            if ref is not None:
                with torch.no_grad():
                    ref[idx] = token_logprobs(response_logits(self.reference, batch), rollouts.response_ids[idx])
        rollouts.old_logprobs = old * rollouts.response_mask
        if topk:
            rollouts.student_topk_ids = topk_ids
        if ref is not None:
            rollouts.ref_logprobs = ref * rollouts.response_mask

    def _fused_forward(self, rollouts: Rollouts):
        """pi_old from the update's own forward pass, when that pass sees the same weights and the whole batch:
        one optimizer update (pi_old = pi_theta before it) over one micro-batch. Saves a full forward per step.
        Returns the update forward's outputs (kept for `_update`), or None when the separate pass is needed."""
        if self.cfg.algorithm.updates_per_step != 1 or len(rollouts) > self.cfg.trainer.micro_batch_size:
            return None
        self.model.train()
        batch = self._pack(rollouts, list(range(len(rollouts))))
        logits, indexer_loss, indexer_metrics = self._forward_for_update(batch)
        logp, entropy = token_logprobs(logits, rollouts.response_ids, return_entropy=True)
        self._record_pi_old(rollouts, update_forward=(batch, logits, logp))
        return logits, logp, entropy, indexer_loss, indexer_metrics

    def _build_loss_mask(self, rollouts: Rollouts) -> None:
        """Which tokens count, and their importance weights against the sampler."""
        alg = self.cfg.algorithm
        mask = rollouts.response_mask.clone()
        if alg.truncated == "drop":
            mask[rollouts.truncated] = 0
        elif alg.truncated == "downweight":
            mask[rollouts.truncated] *= alg.truncated_weight
        if alg.filter_zero_variance_groups and rollouts.rewards is not None:
            from rl.algorithms import group_stats

            _, std, _ = group_stats(rollouts.rewards, rollouts.group_ids)
            keep = (std > 0).float()
            rollouts.metrics["filter/zero_variance_frac"] = float(1 - keep.mean())
            mask = mask * keep.unsqueeze(-1).to(mask.dtype)
        sampled = self.cfg.rollout.backend != "reference"
        if sampled and alg.mismatch != "none":
            log_ratio = (rollouts.old_logprobs - rollouts.sampler_logprobs) * rollouts.response_mask
            ratio = torch.exp(log_ratio)
            if alg.mismatch == "tis":
                rollouts.token_weights = torch.clamp(ratio, max=alg.mismatch_cap)
            else:
                keep = ((ratio >= alg.mismatch_low) & (ratio <= alg.mismatch_high)).float()
                rollouts.metrics["mismatch/masked_frac"] = float(masked_mean(1 - keep, rollouts.response_mask))
                mask = mask * keep
        if sampled and rollouts.old_logprobs is not None:
            rm = rollouts.response_mask
            diff = (rollouts.old_logprobs - rollouts.sampler_logprobs).abs()
            rollouts.metrics["mismatch/abs_logprob_diff"] = float(masked_mean(diff, rm))
            rollouts.metrics["mismatch/max_abs_logprob_diff"] = float((diff * rm).max())
        rollouts.loss_mask = mask

    def _update(self, rollouts: Rollouts, fused=None) -> dict[str, float]:
        """`updates_per_step` optimizer steps over disjoint mini-batches, each accumulated over micro-batches.
        `fused`: the whole batch's update forward, already run by `_fused_forward` (one update, one micro-batch)."""
        alg = self.cfg.algorithm
        self.model.train()
        if fused is not None:  # one mini-batch, one micro-batch, in the order the forward saw
            minis = (torch.arange(len(rollouts)),)
        else:
            order = torch.randperm(len(rollouts), generator=torch.Generator().manual_seed(self.cfg.run.seed + self.step))
            minis = order.chunk(alg.updates_per_step)
        totals: dict[str, float] = {}
        count = 0
        for mini in minis:
            mini_roll = rollouts.select(mini)
            units_total = _units(mini_roll.loss_mask, alg.loss_agg, alg.policy_loss)
            self.optimizer.zero_grad(set_to_none=True)
            groups = [list(range(len(mini_roll)))] if fused is not None else self._micro_batches(mini_roll)
            for idx in groups:
                micro = mini_roll.select(idx)
                if fused is not None:
                    logits, logp, position_entropy, indexer_loss, indexer_metrics = fused
                else:
                    batch = self._pack(micro, list(range(len(micro))))
                    logits, indexer_loss, indexer_metrics = self._forward_for_update(batch)
                    logp, position_entropy = token_logprobs(logits, micro.response_ids, return_entropy=True)
                loss, metrics = self.policy_loss(
                    logp, micro.old_logprobs, micro.advantages, micro.loss_mask, alg, weights=micro.token_weights
                )
                share = _units(micro.loss_mask, alg.loss_agg, alg.policy_loss) / max(units_total, 1e-9)
                # logged from the log-prob pass; recomputed with a graph only when an entropy bonus trains on it
                entropy = (_entropy(logits, micro.response_mask) if alg.entropy_coef
                           else masked_mean(position_entropy, micro.response_mask))
                total = loss
                for fn, weight in self.logit_losses.values():
                    extra, extra_metrics = fn(logits, micro, micro.response_mask, alg)
                    total = total + weight * extra
                    metrics.update(extra_metrics)
                if alg.entropy_coef:
                    total = total - alg.entropy_coef * entropy
                if indexer_loss is not None:
                    total = total + self.cfg.model.dsa.indexer_loss_weight * indexer_loss
                    metrics.update(indexer_metrics)
                if self.reference is not None:
                    kl = _k3_kl(logp, micro.ref_logprobs, micro.loss_mask, alg.loss_agg)
                    total = total + alg.kl_coef * kl
                    metrics["actor/kl_ref"] = float(kl)
                (total * share).backward()
                metrics.update({"actor/loss": loss.item(), "actor/entropy": entropy.item()})
                for k, v in metrics.items():
                    totals[k] = totals.get(k, 0.0) + v * share / len(minis)
            params = [p for p in self.model.parameters() if p.requires_grad]
            if self.cfg.optim.grad_clip:
                norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip)
                totals["actor/grad_norm"] = totals.get("actor/grad_norm", 0.0) + float(norm) / len(minis)
            self.optimizer.step()
            self.scheduler.step()
            count += 1
        return totals

    def _forward_for_update(self, batch) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
        """Response logits `[B, T, V]`, plus the DSA indexer's KL when a DSA stage trains it (same forward)."""
        stage = self.cfg.model.dsa.stage
        if stage == "none":
            return response_logits(self.model, batch), None, {}
        from models.dsa.training import indexer_kl_loss

        t_len = batch.response_mask.shape[1]
        inputs = batch.model_inputs()
        input_ids, attention_mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
        loss, metrics, out = indexer_kl_loss(
            self.model, input_ids, attention_mask, mode=stage, return_outputs=True, logits_to_keep=t_len + 1, **inputs
        )
        return out.logits[:, :-1, :], loss, {f"dsa/{k}": v for k, v in metrics.items()}

    def _micro_batches(self, rollouts: Rollouts) -> list[list[int]]:
        """Index lists of at most `micro_batch_size` sequences, grouped by length (prompt + response): a
        micro-batch is padded to its own longest prompt, so mixing 25-token and 95-token prompts in one would
        spend most of the forward on padding."""
        size = max(1, self.cfg.trainer.micro_batch_size)
        lengths = [len(p.input_ids) + int(m.sum()) for p, m in zip(rollouts.prompts, rollouts.response_mask)]
        order = sorted(range(len(rollouts)), key=lambda i: lengths[i])
        return [order[i : i + size] for i in range(0, len(order), size)]

    def _pack(self, rollouts: Rollouts, idx: list[int]):
        responses = _unpadded_responses(rollouts, idx)
        return pack([rollouts.prompts[i] for i in idx], responses, self.tokenizer.pad_token_id,
                    response_len=rollouts.response_ids.shape[1])

    def _rollout_metrics(self, rollouts: Rollouts) -> dict[str, float]:
        lengths = rollouts.response_mask.sum(-1)
        out = {
            "rollout/response_len": float(lengths.mean()),
            "rollout/truncated_frac": float(rollouts.truncated.float().mean()),
        }
        by_domain: dict[str, list[float]] = {}
        for s, r in zip(rollouts.samples, rollouts.rewards.tolist()):
            by_domain.setdefault(s.domain, []).append(r)
        for d, values in by_domain.items():
            out[f"reward/{d}"] = sum(values) / len(values)
        return out

    # ------------------------------------------------------------------ checkpoints and evaluation

    def _save(self, step: int) -> Path:
        state = {
            "step": step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data": self.stream.state_dict(),
            "rng": rng_state(),
            "eval_history": self.eval_history,
        }
        if hasattr(self.model, "peft_config"):
            from peft import get_peft_model_state_dict

            state["adapter"] = get_peft_model_state_dict(self.model)
        return save_checkpoint(
            self.run_dir, step, lambda folder: save_student(self.model, self.tokenizer, folder), state,
            keep=self.cfg.trainer.keep_checkpoints,
        )

    def _evaluated(self, step: int) -> bool:
        return any(e["step"] == step for e in self.eval_history)

    def evaluate(self, step: int) -> dict[str, Any]:
        report = evaluate_samples(self.cfg, self.model, self.renderer, self.eval_samples, self.scorer, step)
        result = {"step": step, "domains": report}
        if self.cfg.trainer.eval_teachers and self.cfg.teachers:
            if not self.teacher_eval:
                self.teacher_eval = self.evaluate_teachers()
            result["teachers"] = self.teacher_eval
        out = self.run_dir / "eval"
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write_json(out / f"{step:06d}.json", result)
        self.eval_history = [e for e in self.eval_history if e["step"] != step] + [result]
        self._plot()
        return result

    def evaluate_teachers(self) -> dict[str, Any]:
        """Each teacher on the held-out samples routed to it, generating in its own view."""
        from models.factory import load_model, load_tokenizer

        out: dict[str, Any] = {}
        for t in self.cfg.teachers:
            route = Route(t.name, tuple(t.domains), tuple(t.modalities), t.weight)
            samples = [s for s in self.eval_samples if route.matches(s)]
            if not samples:
                continue
            model = load_model(t.path).eval()
            renderer = ChatRenderer(load_tokenizer(t.path), vision_layout(model), t.template_kwargs)
            out[t.name] = evaluate_samples(self.cfg, model, renderer, samples, self.scorer, self.step, view=t.view)
        return out

    def write_summary(self) -> dict[str, Any]:
        """`eval/summary.json`: per domain, the student before (first eval) and after (last), and its teacher(s)."""
        from evals.watch import summarize

        summary = summarize(self.eval_history, self.run_dir)
        _atomic_write_json(self.run_dir / "eval" / "summary.json", summary)
        return summary

    def _plot(self) -> None:
        from rl.plots import plot_eval_history

        plot_eval_history(self.eval_history, self.teacher_eval, self.run_dir / "plots" / "heldout_reward.png")

    def close(self) -> None:
        self.stream.close()
        self.scorer.close()
        for pool in list(self.teacher_pools.values()) + [self.rollout_pool]:
            pool.shutdown()


# ---------------------------------------------------------------------- small pure helpers


def _unpadded_responses(rollouts: Rollouts, idx) -> list[list[int]]:
    """The response token ids of rows `idx`, without their right padding."""
    return [rollouts.response_ids[i, : int(rollouts.response_mask[i].sum())].tolist() for i in idx]


def _units(mask: torch.Tensor, loss_agg: str, policy_loss: str) -> float:
    """How much a (micro-)batch weighs in the step's loss, so that accumulation equals one big batch."""
    if loss_agg == "token_mean":
        return float(mask.sum())
    if loss_agg == "seq_mean_token_sum_norm":
        return float(mask.shape[0])
    return float((mask.sum(-1) > 0).sum())


def _entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean entropy, differentiable (the entropy bonus). Only-logged entropy comes from `token_logprobs`'s
    pass over the vocabulary instead: no `[B, T, V]` log-softmax / exp / product graph."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    ent = -(logp.exp() * logp).sum(-1)
    return masked_mean(ent, mask)


def _k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, loss_agg: str) -> torch.Tensor:
    """k3 estimator of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1, >= 0 and unbiased."""
    delta = ref_logp - logp
    return aggregate_token_loss(torch.exp(delta) - delta - 1, mask, loss_agg)


def _atomic_write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
