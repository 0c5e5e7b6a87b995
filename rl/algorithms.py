"""Policy losses and advantage estimators: small registered functions over `[B, T]` tensors.

Adding an algorithm is one function and one name:

    @register_policy_loss("my_loss")
    def my_loss(logp, old_logp, advantages, mask, cfg, weights=None) -> (loss, metrics): ...

    @register_advantage_estimator("my_adv")
    def my_adv(rewards, group_ids, mask, cfg, rollouts=None) -> advantages: ...

Shapes: logp, old_logp, advantages, mask, weights `[B, T]` over response tokens (mask 1 = counted);
rewards, group_ids `[B]`. `cfg` is a mapping or an object with attributes (`clip_low`, `clip_high`, ...);
missing keys take `AlgorithmConfig`'s defaults (`rl.config`, the one place they are declared). `weights` are per-token importance
weights against the sampler (truncated IS), detached; None means 1.

Losses that need more of the distribution than the sampled token's log-prob (a teacher's top-k KL) are
*logit losses*, added to the policy loss with a weight (`algorithm.logit_losses: {name: weight}`). They get the
student's log-probs at each routed teacher's top-k ids, read from the hidden states in the same chunked pass as
the sampled token's (no `[B, T, V]` logits exist):

    @register_logit_loss("my_term")
    def my_term(student_at_teacher_topk, rollouts, mask, cfg) -> (loss, metrics): ...   # {teacher: [B, T, k]}
"""

from __future__ import annotations

from typing import Any
from collections.abc import Callable

import torch

from core.registry import Registry

PolicyLoss = Callable[..., tuple[torch.Tensor, dict[str, float]]]
AdvantageEstimator = Callable[..., torch.Tensor]

# Algorithms that live in other packages register themselves on import; their lazy entries name them, so that
# the names are known (to the config's choices, to `check`) before the package is imported.
POLICY_LOSSES: Registry[PolicyLoss] = Registry("policy loss")
ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage estimator")
ADVANTAGE_ESTIMATORS.register("mopd", "mopd.estimator:mopd_advantage")
LOGIT_LOSSES: Registry[PolicyLoss] = Registry("logit loss")
LOGIT_LOSSES.register("teacher_kl", "mopd.dense:teacher_topk_kl", needs_teacher_topk=True)
LOGIT_LOSSES.register("teacher_fkl", "mopd.dense:teacher_topk_forward_kl", needs_teacher_topk=True)


def register_policy_loss(name: str, uses_old_logprobs: bool = True) -> Callable[[PolicyLoss], PolicyLoss]:
    """`uses_old_logprobs=False` tells the trainer it may skip the pi_old forward pass for this loss."""

    def wrap(fn: PolicyLoss) -> PolicyLoss:
        fn.uses_old_logprobs = uses_old_logprobs  # type: ignore[attr-defined]
        return POLICY_LOSSES.register(name, fn)

    return wrap


def register_advantage_estimator(
    name: str, uses_old_logprobs: bool = False
) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    """`uses_old_logprobs=True` asks the trainer for `rollouts.old_logprobs` before the estimator runs."""

    def wrap(fn: AdvantageEstimator) -> AdvantageEstimator:
        fn.uses_old_logprobs = uses_old_logprobs  # type: ignore[attr-defined]
        return ADVANTAGE_ESTIMATORS.register(name, fn)

    return wrap


def register_logit_loss(name: str, needs_teacher_topk: bool = False) -> Callable[[PolicyLoss], PolicyLoss]:
    """`fn(student_at_teacher_topk {teacher: [B, T, k]}, rollouts, mask [B, T], cfg) -> (scalar loss, metrics)`,
    a token mean over `mask`; differentiable w.r.t. the student's log-probs at each routed teacher's top-k ids
    (`rollouts.teacher_topk_ids[teacher]`, in that order). `needs_teacher_topk=True` lets `check`
    refuse a config whose teachers return no top-k log-probs."""

    def wrap(fn: PolicyLoss) -> PolicyLoss:
        fn.needs_teacher_topk = needs_teacher_topk  # type: ignore[attr-defined]
        return LOGIT_LOSSES.register(name, fn, needs_teacher_topk=needs_teacher_topk)

    return wrap


def get_policy_loss(name: str) -> PolicyLoss:
    """`fn(logp, old_logp, advantages, mask, cfg, weights=None) -> (loss, metrics)`."""
    return POLICY_LOSSES.get(name)


def get_advantage_estimator(name: str) -> AdvantageEstimator:
    """`fn(rewards, group_ids, mask, cfg, rollouts=None) -> advantages [B, T]`."""
    return ADVANTAGE_ESTIMATORS.get(name)


def get_logit_loss(name: str) -> PolicyLoss:
    """`fn(student_at_teacher_topk, rollouts, mask, cfg) -> (loss, metrics)`."""
    return LOGIT_LOSSES.get(name)


def logit_loss_names() -> list[str]:
    return LOGIT_LOSSES.names()


def policy_loss_names() -> list[str]:
    return POLICY_LOSSES.names()


def advantage_estimator_names() -> list[str]:
    return ADVANTAGE_ESTIMATORS.names()


def cfg_get(cfg: Any, key: str) -> Any:
    """`algorithm.<key>` from a mapping or an attribute object; a key it lacks takes `AlgorithmConfig`'s default,
    the one place defaults are declared (a key that is not an `algorithm.*` option is a KeyError)."""
    from rl.config import algorithm_default

    if isinstance(cfg, dict) and key in cfg:
        return cfg[key]
    if cfg is not None and not isinstance(cfg, dict) and hasattr(cfg, key):
        return getattr(cfg, key)
    return algorithm_default(key)


# ----------------------------------------------------------------------------- helpers


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x where mask is 1; 0 (not NaN) where nothing is counted."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def aggregate_token_loss(loss: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Reduce a per-token loss `[B, T]` to a scalar.

    - "seq_mean_token_mean" (default): each sequence's token mean, then the mean over sequences that have at
      least one counted token (every sequence weighs the same, whatever its length: GSPO's and GRPO's papers).
    - "token_mean": all counted tokens pooled (long sequences weigh more; DAPO).
    - "seq_mean_token_sum_norm": token sums divided by B*T (Dr. GRPO: no length normalisation per sequence).
    """
    if mode == "seq_mean_token_mean":
        lengths = mask.sum(-1)
        has_tokens = (lengths > 0).float()
        per_seq = (loss * mask).sum(-1) / lengths.clamp(min=1)
        return (per_seq * has_tokens).sum() / has_tokens.sum().clamp(min=1)
    if mode == "token_mean":
        return masked_mean(loss, mask)
    if mode == "seq_mean_token_sum_norm":
        return (loss * mask).sum() / (mask.shape[0] * mask.shape[1])
    raise ValueError(f"unknown loss aggregation {mode!r}; use seq_mean_token_mean, token_mean or seq_mean_token_sum_norm")


def per_sequence_weights(mask: torch.Tensor) -> torch.Tensor:
    """`mask [B, T]` with each sequence's counted tokens weighted 1 / its length: `masked_mean(x, weights)` is then
    `aggregate_token_loss(x, mask, "seq_mean_token_mean")` (each sequence's token mean, then the mean over the
    sequences that have a counted token)."""
    return mask / mask.sum(-1, keepdim=True).clamp(min=1)


def group_stats(values: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-response group mean, unbiased group std and group size of `values [B]`, by vectorised scatter."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    values = values.double()
    count = torch.zeros(n_groups, dtype=torch.float64, device=values.device).index_add_(0, inverse, torch.ones_like(values))
    total = torch.zeros(n_groups, dtype=torch.float64, device=values.device).index_add_(0, inverse, values)
    mean = total / count
    sq = torch.zeros(n_groups, dtype=torch.float64, device=values.device).index_add_(0, inverse, (values - mean[inverse]) ** 2)
    std = torch.sqrt(sq / (count - 1).clamp(min=1))
    return mean[inverse], std[inverse], count[inverse]


# ----------------------------------------------------------------------------- advantage estimators


@register_advantage_estimator("grpo")
def group_normalized_advantage(
    rewards: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor, cfg: Any = None, rollouts: Any = None
) -> torch.Tensor:
    """Outcome advantage `A_i = (r_i - mean_group) / (std_group + eps)`, the same for every token of response i.

    cfg: `norm_std` (False gives Dr. GRPO's mean-centring only), `adv_eps`.
    A group whose rewards are all equal gets 0 (never NaN); a group of one response gets 0.
    """
    mean, std, count = group_stats(rewards, group_ids)
    adv = rewards.double() - mean
    if cfg_get(cfg, "norm_std"):
        scale = std + cfg_get(cfg, "adv_eps")
        adv = torch.where(scale > 0, adv / torch.where(scale > 0, scale, torch.ones_like(scale)), torch.zeros_like(adv))
    adv = torch.where(count > 1, adv, torch.zeros_like(adv))
    return adv.to(mask.dtype).unsqueeze(-1) * mask


register_advantage_estimator("gspo")(group_normalized_advantage)


@register_advantage_estimator("sft")
def supervised_advantage(
    rewards: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor, cfg: Any = None, rollouts: Any = None
) -> torch.Tensor:
    """A = 1 on every token: with the `nll` loss on demonstration responses this is supervised fine-tuning."""
    return mask.clone()


# ----------------------------------------------------------------------------- policy losses


def _clip_bounds(cfg: Any) -> tuple[float, float]:
    return float(cfg_get(cfg, "clip_low")), float(cfg_get(cfg, "clip_high"))


@register_policy_loss("gspo")
def gspo_loss(logp, old_logp, advantages, mask, cfg=None, weights=None):
    """GSPO: sequence-level, length-normalised ratio `s_i = exp(mean_t(logp - old_logp))`, clipped to
    `[1 - clip_low, 1 + clip_high]`; objective `min(s_i A_i, clip(s_i) A_i)` with `A_i` the token mean of the
    advantages; loss = -mean over sequences (the paper's aggregation; cfg `loss_agg="token_mean"` weighs each
    sequence by its length instead). `weights` (truncated IS) enter as their per-sequence token mean.
    """
    low, high = _clip_bounds(cfg)
    lengths = mask.sum(-1)
    has_tokens = (lengths > 0).to(logp.dtype)
    log_ratio = masked_mean(logp - old_logp, mask, dim=-1)
    ratio = torch.exp(log_ratio)
    adv = masked_mean(advantages, mask, dim=-1)
    clipped_ratio = torch.clamp(ratio, 1 - low, 1 + high)
    objective = torch.minimum(ratio * adv, clipped_ratio * adv)
    if weights is not None:
        objective = objective * masked_mean(weights, mask, dim=-1).detach()
    if cfg_get(cfg, "loss_agg") == "token_mean":
        seq_weight = lengths / lengths.sum().clamp(min=1)
        loss = -(objective * seq_weight).sum()
    else:
        loss = -(objective * has_tokens).sum() / has_tokens.sum().clamp(min=1)
    with torch.no_grad():
        clipped = ((ratio * adv) > (clipped_ratio * adv)).float()
        metrics = {
            "actor/clip_frac": float((clipped * has_tokens).sum() / has_tokens.sum().clamp(min=1)),
            "actor/ratio_mean": float((ratio * has_tokens).sum() / has_tokens.sum().clamp(min=1)),
        }
    return loss, metrics


def _token_clipped_loss(ratio, advantages, mask, cfg, weights):
    """The PPO-style clipped objective per token, weighted, aggregated by cfg `loss_agg`; loss and metrics."""
    low, high = _clip_bounds(cfg)
    clipped_ratio = torch.clamp(ratio, 1 - low, 1 + high)
    objective = torch.minimum(ratio * advantages, clipped_ratio * advantages)
    clipped = ((ratio * advantages) > (clipped_ratio * advantages)).float()
    if weights is not None:
        objective = objective * weights.detach()
    loss = -aggregate_token_loss(objective, mask, cfg_get(cfg, "loss_agg"))
    metrics = {
        "actor/clip_frac": float(masked_mean(clipped, mask)),
        "actor/ratio_mean": float(masked_mean(ratio.detach(), mask)),
    }
    return loss, metrics


@register_policy_loss("gspo_token")
def gspo_token_loss(logp, old_logp, advantages, mask, cfg=None, weights=None):
    """GSPO-token: `s_it = sg[s_i] * pi(y_t) / sg[pi(y_t)]` (value s_i, gradient per token), so per-token
    advantages (MOPD's reverse KL) keep their token resolution; equals GSPO when advantages are constant within
    a sequence. Aggregation: cfg `loss_agg` (default seq_mean_token_mean, the paper's)."""
    log_ratio_seq = masked_mean(logp - old_logp, mask, dim=-1).detach()
    ratio = torch.exp(log_ratio_seq.unsqueeze(-1) + logp - logp.detach())
    return _token_clipped_loss(ratio, advantages, mask, cfg, weights)


@register_policy_loss("grpo")
def grpo_loss(logp, old_logp, advantages, mask, cfg=None, weights=None):
    """GRPO / PPO-clip with a token-level ratio `r_t = exp(logp_t - old_logp_t)` clipped to
    `[1 - clip_low, 1 + clip_high]`. Aggregation: cfg `loss_agg` (default seq_mean_token_mean)."""
    return _token_clipped_loss(torch.exp(logp - old_logp), advantages, mask, cfg, weights)


@register_policy_loss("nll", uses_old_logprobs=False)
def nll_loss(logp, old_logp, advantages, mask, cfg=None, weights=None):
    """`-A_t * logp_t` without a ratio: supervised fine-tuning when A = 1 (the `sft` estimator)."""
    objective = advantages * logp
    if weights is not None:
        objective = objective * weights.detach()
    loss = -aggregate_token_loss(objective, mask, cfg_get(cfg, "loss_agg"))
    return loss, {}


# ----------------------------------------------------------------------------- loss terms and masks


def loss_units(mask: torch.Tensor, loss_agg: str) -> float:
    """How much a (micro-)batch weighs in a step's policy loss under `loss_agg`, so that micro-batches (and
    ranks) add up to one big batch: counted tokens, rows, or sequences with at least one counted token."""
    if loss_agg == "token_mean":
        return float(mask.sum())
    if loss_agg == "seq_mean_token_sum_norm":
        return float(mask.shape[0])
    return float((mask.sum(-1) > 0).sum())


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || ref) per token `[B, T]`: exp(ref - logp) - (ref - logp) - 1, >= 0, unbiased."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def token_loss_mask(rollouts: Any, cfg: Any, sampled: bool) -> None:
    """Which tokens count (`rollouts.loss_mask [B, T]`) and their importance weights against the sampler
    (`rollouts.token_weights`): truncated responses, zero-variance groups, the sampler/trainer mismatch rule.
    `sampled`: the responses came from a sampler (not demonstrations), so pi_old vs sampler is meaningful."""
    mask = rollouts.response_mask.clone()
    if cfg.truncated == "drop":
        mask[rollouts.truncated] = 0
    elif cfg.truncated == "downweight":
        mask[rollouts.truncated] *= cfg.truncated_weight
    if cfg.filter_zero_variance_groups and rollouts.rewards is not None:
        _, std, _ = group_stats(rollouts.rewards, rollouts.group_ids)
        keep = (std > 0).float()
        rollouts.metrics["filter/zero_variance_frac"] = float(1 - keep.mean())
        mask = mask * keep.unsqueeze(-1).to(mask.dtype)
    if sampled and rollouts.old_logprobs is not None:
        rm = rollouts.response_mask
        diff = (rollouts.old_logprobs - rollouts.sampler_logprobs).abs()
        rollouts.metrics["mismatch/abs_logprob_diff"] = float(masked_mean(diff, rm))
        rollouts.metrics["mismatch/max_abs_logprob_diff"] = float((diff * rm).max())
        if cfg.mismatch != "none":
            ratio = torch.exp((rollouts.old_logprobs - rollouts.sampler_logprobs) * rm)
            if cfg.mismatch == "tis":
                rollouts.token_weights = torch.clamp(ratio, max=cfg.mismatch_cap)
            else:
                keep = ((ratio >= cfg.mismatch_low) & (ratio <= cfg.mismatch_high)).float()
                rollouts.metrics["mismatch/masked_frac"] = float(masked_mean(1 - keep, rm))
                mask = mask * keep
    rollouts.loss_mask = mask
