"""The one training loop, as a controller of worker groups. MOPD, GSPO Context-RL / Video-RL and supervised
warm-up differ only in the registered advantage estimator, policy loss and rewards named in the config.

    placement = plan_placement(cfg)                             printed at start
    prompts   = stream.next_batch()                             prompts (G copies each)
    rollouts  = rollout engines .generate                       sync 1: sampled responses + sampler log-probs
    rollouts.rewards          = reward workers                  sync 2
    rollouts.teacher_logprobs = teacher engines (routed)        sync 3: each teacher in its own view
    rollouts.old_logprobs     = policy.logprobs                 sync 4: pi_old on the training ranks
    rollouts.advantages       = estimator(...)                  "mopd", "gspo", "grpo", "sft", ...
    metrics   = policy.update(rollouts)                         sync 5: policy loss + logit losses, FSDP2 shards
    engines  <- policy.weight_buckets()                         sync 6: weights streamed from the shards
    checkpoint (sharded, atomic; HF export) -> eval every N steps

The trainer holds no model: the student, its optimizer and its shards live in the policy worker group
(`rl.policy`, `rl.worker_group`); rollout engines and teachers are `rollout.actors.ActorPool`s.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.chat import ChatRenderer
from models.factory import quiet_libraries
from rewards.inputs import RewardTrainerState, reward_requests
from rewards.scorer import RewardScorer
from rl.algorithms import get_advantage_estimator, get_policy_loss, token_loss_mask
from rl.checkpoint import latest_checkpoint, load_trainer_state, rng_state, save_checkpoint, set_rng_state
from rl.config import JobConfig
from rl.config_loader import to_dict
from rl.data import PromptStream, load_tasks
from rl.evaluation import evaluate_samples, prepare_eval_samples, video_options
from rl.logger import MetricsLogger
from rl.engines import start_eval_engine, start_policy, start_rollouts, start_teachers, uses_ray
from rl.placement import plan_placement, ray_bundles
from rl.rollouts import Rollouts
from rl.run_dir import claim_run_dir
from rl.student import resolve_tokenizer, student_vision_layout
from rl.worker_group import PolicyGroup
from rollout.base import SamplingSettings
from teachers.routing import Route

class Trainer:
    def __init__(self, cfg: JobConfig, resolved: dict[str, Any] | None = None, policy: PolicyGroup | None = None):
        quiet_libraries()
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        self.resolved = resolved if resolved is not None else to_dict(cfg)
        claim_run_dir(self.run_dir, self.resolved, cfg.run.resume, cfg.run.allow_config_change)
        if cfg.trainer.threads:
            torch.set_num_threads(cfg.trainer.threads)
        _seed_everything(cfg.run.seed)
        self.plan = plan_placement(cfg)
        print(self.plan.format(), flush=True)
        self.bundles = ray_bundles(self.plan) if uses_ray(self.plan) else {}
        self.policy = policy or start_policy(cfg, self.plan, self.bundles)
        self.device = self.policy.device  # the controller's tensors: rank 0's device, or the CPU of a Ray driver
        self.tokenizer = resolve_tokenizer(cfg)
        layout = student_vision_layout(cfg, self.tokenizer)
        self.renderer = ChatRenderer(self.tokenizer, layout, cfg.model.template_kwargs)
        self.train_samples = load_tasks(cfg.data.train, cfg.run.seed, weighted=True)
        self.eval_samples = load_tasks(cfg.data.eval, cfg.run.seed)
        self.stream = self._prompt_stream(layout)
        self.scorer = RewardScorer.from_config(cfg.rewards)
        self._check_reward_routes()
        self.estimator = get_advantage_estimator(cfg.algorithm.advantage)
        self.uses_pi_old = self._needs_old_logprobs()
        self.step = 0
        self.eval_history: list[dict[str, Any]] = []
        if not self._maybe_resume():
            self._save(0)  # step 0: the starting model, what rollout engines load and "before" compares to
        export = latest_checkpoint(self.run_dir)
        self.router, self.teacher_pools = start_teachers(
            cfg, self.bundles, sorted({s.domain for s in self.train_samples}), self.tokenizer)
        self.rollout_pool = start_rollouts(cfg, export, self.bundles)
        self.eval_engine = start_eval_engine(cfg, export, self.device)
        self.teacher_eval: dict[str, Any] = {}

    # ------------------------------------------------------------------ setup

    def _prompt_stream(self, layout):
        """Training prompts in seeded order, with videos decoded by background workers ahead of the trainer;
        held-out videos are decoded once here. Unusable videos are skipped, counted and reported."""
        from tasks.prefetch import PrefetchingStream

        d = self.cfg.data
        video = video_options(d, layout)
        self.eval_samples = prepare_eval_samples(self.eval_samples, d, layout)
        return PrefetchingStream(PromptStream(self.train_samples, self.cfg.run.seed), workers=d.decode_workers,
                                 prefetch_batches=d.prefetch_batches, **video)

    def _check_reward_routes(self) -> None:
        domains = sorted({s.domain for s in self.train_samples + self.eval_samples})
        missing = [d for d in domains if d not in self.cfg.rewards.routes and not any(
            s.reward for s in self.train_samples if s.domain == d)]
        if missing:
            raise ValueError(f"rewards.routes: no reward for domain(s) {missing}; routes: {list(self.cfg.rewards.routes)}")

    def _needs_old_logprobs(self) -> bool:
        """pi_old is needed by ratio losses, by MOPD (the student side of the KL), the mismatch correction and
        the KL penalty; supervised warm-up (nll on demonstrations) needs none of them."""
        alg = self.cfg.algorithm
        return (getattr(get_policy_loss(alg.policy_loss), "uses_old_logprobs", True)
                or getattr(self.estimator, "uses_old_logprobs", False) or alg.kl_coef > 0
                or (alg.mismatch != "none" and self.cfg.rollout.backend != "reference"))

    def _maybe_resume(self) -> bool:
        if not self.cfg.run.resume:
            return False
        folder = latest_checkpoint(self.run_dir)
        if folder is None:
            return False
        state = load_trainer_state(folder)
        self.policy.load(folder)
        self.stream.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        self.step = state["step"]
        self.eval_history = state.get("eval_history", [])
        print(f"resumed {self.run_dir} from {folder.name} (step {self.step})", flush=True)
        return True

    # ------------------------------------------------------------------ the loop

    def fit(self) -> None:
        cfg = self.cfg
        logger = MetricsLogger(
            self.run_dir, cfg.trainer.steps, self.step, progress=cfg.logging.progress,
            tensorboard=cfg.logging.tensorboard, wandb=cfg.logging.wandb, wandb_project=cfg.logging.wandb_project,
            config=self.resolved, desc=cfg.run.name,
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

    def train_step(self) -> dict[str, float]:
        cfg, alg = self.cfg, self.cfg.algorithm
        t0 = time.perf_counter()
        prompt_samples = self.stream.next_batch(cfg.data.prompts_per_step)
        rollouts = self._generate(prompt_samples)  # sync 1: rollout engines
        t_gen = time.perf_counter()
        self._score_rewards(rollouts)  # sync 2: reward workers
        t_reward = time.perf_counter()
        self._score_teachers(rollouts)  # sync 3: teacher engines
        t_teacher = time.perf_counter()
        if self.uses_pi_old:
            self.policy.logprobs(rollouts)  # sync 4: training ranks (pi_old)
        t_old = time.perf_counter()
        token_loss_mask(rollouts, alg, sampled=cfg.rollout.backend != "reference")
        rollouts.advantages = self.estimator(rollouts.rewards, rollouts.group_ids, rollouts.loss_mask, alg,
                                             rollouts=rollouts)
        update_metrics = self.policy.update(rollouts, self.step)  # sync 5: training ranks (update)
        t_update = time.perf_counter()
        self._sync_weights()  # sync 6: shards -> rollout engines (and the evaluation engine)
        t_sync = time.perf_counter()
        metrics = {**rollouts.metrics, **update_metrics, **self._rollout_metrics(rollouts), **self.stream.metrics()}
        metrics.update({
            "time/generate_s": t_gen - t0, "time/reward_s": t_reward - t_gen, "time/teachers_s": t_teacher - t_reward,
            "time/old_logprobs_s": t_old - t_teacher, "time/update_s": t_update - t_old, "time/sync_s": t_sync - t_update,
            "time/step_s": t_sync - t0, "perf/generated_tokens": float(rollouts.response_mask.sum()),
            "optim/lr": cfg.optim.lr * self._lr_factor_after(self.step + 1),
        })
        return metrics

    def _lr_factor_after(self, steps: int) -> float:
        """The schedule's factor for the last update of `steps` steps (what the optimizer just used)."""
        from rl.schedule import lr_factor, schedule_for

        total, warm, schedule = schedule_for(self.cfg)
        return lr_factor(steps * self.cfg.algorithm.updates_per_step - 1, total, warm, schedule)

    # ------------------------------------------------------------------ stages

    def _generate(self, prompt_samples) -> Rollouts:
        cfg = self.cfg
        g = cfg.rollout.group_size
        samples = [s for s in prompt_samples for _ in range(g)]
        rendered = [self.renderer.render(s.messages, s.tools) for s in samples]
        targets = [self.renderer.encode_response(s.target) if s.target else None for s in samples]
        settings = SamplingSettings(
            max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
            seed=cfg.run.seed * 1_000_003 + self.step, suppress_token_ids=self.renderer.placeholder_ids,
        )
        from rollout.worker import combine_generations

        gens = self.rollout_pool.map("generate", rendered, targets, settings=settings, combine=combine_generations,
                                     describe=lambda shard: f"{len(shard)} prompts")
        group_ids = torch.arange(len(prompt_samples)).repeat_interleave(g)
        return Rollouts.from_generations(samples, rendered, group_ids, gens, self.tokenizer.pad_token_id,
                                         self.renderer.decode_response).to(self.device)

    def _score_rewards(self, rollouts: Rollouts) -> None:
        requests = reward_requests(rollouts.samples, rollouts.completions, rollouts.unpadded_responses())
        result = self.scorer.score(requests, trainer_state=RewardTrainerState(self.step, self.cfg.trainer.steps))
        rollouts.rewards = torch.as_tensor(result.rewards, dtype=torch.float32, device=self.device)
        rollouts.reward_invalid = torch.as_tensor(result.invalid, dtype=torch.bool, device=self.device)
        rollouts.metrics.update(result.metrics())

    def _score_teachers(self, rollouts: Rollouts) -> None:
        if self.router is None:
            return
        from teachers.base import combine_scores

        weights = self.router.route(rollouts.samples)
        responses = rollouts.unpadded_responses()
        for name, w in weights.items():
            idx = torch.nonzero(w > 0).flatten().tolist()
            scores = None
            if idx:
                scores = self.teacher_pools[name].map(
                    "score", [rollouts.samples[i] for i in idx], [responses[i] for i in idx], combine=combine_scores,
                    describe=lambda shard: f"{len(shard)} samples (first: {shard[0].id})")
            rollouts.add_teacher(name, w, idx, scores)

    def _sync_weights(self, engines: str = "rollout") -> None:
        """Stream the new weights bucket by bucket from the training ranks to the rollout engines (after every
        update) or to the evaluation engine (before an evaluation that follows updates)."""
        buckets = self.policy.weight_buckets(self.cfg.trainer.weight_sync_mb)
        bucket = next(buckets, None)
        while bucket is not None:  # one bucket ahead, so the engines know which one is the sync's last
            upcoming = next(buckets, None)
            if engines == "rollout":
                self.rollout_pool.broadcast("load_weights", bucket, upcoming is None, what="syncing weights")
            else:
                self.eval_engine.load_weights(bucket, last=upcoming is None)
            bucket = upcoming
        self.eval_engine_stale = engines == "rollout" and self.eval_engine is not None

    def _rollout_metrics(self, rollouts: Rollouts) -> dict[str, float]:
        out = {"rollout/response_len": float(rollouts.response_mask.sum(-1).mean()),
               "rollout/truncated_frac": float(rollouts.truncated.float().mean())}
        by_domain: dict[str, list[float]] = {}
        for s, r in zip(rollouts.samples, rollouts.rewards.tolist()):
            by_domain.setdefault(s.domain, []).append(r)
        out.update({f"reward/{d}": sum(v) / len(v) for d, v in by_domain.items()})
        return out

    # ------------------------------------------------------------------ checkpoints and evaluation

    def _save(self, step: int) -> Path:
        def write(folder: Path) -> None:
            self.policy.save(folder)
            self.policy.export_hf(folder)

        state = {"step": step, "data": self.stream.state_dict(), "rng": rng_state(), "eval_history": self.eval_history}
        return save_checkpoint(self.run_dir, step, write, state, keep=self.cfg.trainer.keep_checkpoints)

    def _link_final(self) -> None:
        """`<run>/final` -> the last checkpoint: a stable path for the next stage (teachers, base student)."""
        last = latest_checkpoint(self.run_dir)
        link, tmp = self.run_dir / "final", self.run_dir / ".final.tmp"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(Path("checkpoints") / last.name)
        tmp.replace(link)

    def _evaluated(self, step: int) -> bool:
        return any(e["step"] == step for e in self.eval_history)

    def _eval_generate(self, prompts, settings):
        if self.eval_engine is not None:
            if getattr(self, "eval_engine_stale", False):
                self._sync_weights("evaluation")
            return self.eval_engine.generate(prompts, settings)
        from rollout.worker import combine_generations

        return self.rollout_pool.map("generate", prompts, [None] * len(prompts), settings=settings,
                                     combine=combine_generations, describe=lambda shard: f"{len(shard)} eval prompts")

    def evaluate(self, step: int) -> dict[str, Any]:
        report = evaluate_samples(self.cfg, None, self.renderer, self.eval_samples, self.scorer, step,
                                  engine=self._eval_generate)
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
        from models.factory import load_model, load_tokenizer, vision_layout

        out: dict[str, Any] = {}
        for t in self.cfg.teachers:
            route = Route(t.name, tuple(t.domains), tuple(t.modalities), t.weight)
            samples = [s for s in self.eval_samples if route.matches(s)]
            if not samples:
                continue
            model = load_model(t.path).to(self.device).eval()
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
        for pool in [*self.teacher_pools.values(), *([self.rollout_pool] if hasattr(self, "rollout_pool") else [])]:
            pool.shutdown()
        self.policy.close()


def train_job(cfg: JobConfig, resolved: dict[str, Any], label: str) -> None:
    """Check a job as `vlpost check --require-files` would (what it reports stops the run before any model,
    actor or data is loaded: a ConfigError naming `label`), then train it to the end; the one path of `train`,
    the demo's stages and the comparison's."""
    from rl.config_check import check_config
    from rl.config_loader import ConfigError

    problems, _ = check_config(cfg, require_files=True)
    if problems:
        raise ConfigError(f"{label}: " + "; ".join(problems))
    trainer = Trainer(cfg, resolved)
    try:
        trainer.fit()
    finally:
        trainer.close()


# ---------------------------------------------------------------------- small pure helpers


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _atomic_write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
