"""Score a batch of samples: route each to its domain's reward, run them in worker processes, collect results.

A bad sample never crashes a run: InvalidAnswer becomes reward 0 counted by reason. A bad reward does: any other
exception, a wrong-length return, NaN/inf or a non-number, or a timeout raises `RewardError` naming the reward and
the sample (on_error="raise", the default), or yields 0 and is counted (on_error="zero", with a warning the first
time a reward fails; a reward that has failed on more than `max_error_frac` of its samples, once it has scored
`judge_after` of them, is broken, not flaky, and raises all the same).

Time limits hold in every mode: worker processes are killed past `timeout_s`; in-process scoring
(`num_workers=0`) abandons the overrunning call in its thread (`rewards.timeouts`). Loading a spec (importing a
user's module) in this process is bounded by `load_timeout_s`.

`score()` is not thread-safe; use one scorer per thread.
"""

from __future__ import annotations

import json
import math
import pickle
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rewards.errors import RewardError, RewardSpecError
from rewards.pool import Job, WorkerPool
from rewards.registry import BatchReward, Outcome, call_units, describe_exception, get_reward
from rewards.text import truncate
from rewards.timeouts import RewardTimeout, call_with_timeout


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


@dataclass
class RewardResult:
    """rewards: `[B]` float64 (0 where failed or invalid; an invalid part of a combined reward adds 0). invalid: `[B]` bool. failed: `[B]` bool (errors zeroed
    under on_error="zero"). invalid_reasons: "reward: reason" -> count. errors: one message per failed sample."""

    rewards: np.ndarray
    invalid: np.ndarray
    invalid_reasons: Counter
    errors: list[str]
    failed: np.ndarray
    domains: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    def metrics(self) -> dict[str, float]:
        """`reward/mean`, `reward/invalid_frac`, `reward/error_frac`, `reward/time_s`, and per domain
        `reward/<domain>/mean` and `reward/<domain>/invalid_frac`."""
        if len(self.rewards) == 0:
            return {"reward/time_s": self.elapsed_s}
        out = {
            "reward/mean": float(self.rewards.mean()),
            "reward/invalid_frac": float(self.invalid.mean()),
            "reward/error_frac": float(self.failed.mean()),
            "reward/time_s": float(self.elapsed_s),
        }
        domains = np.asarray(self.domains)
        for domain in sorted(set(self.domains)):
            mask = domains == domain
            out[f"reward/{domain}/mean"] = float(self.rewards[mask].mean())
            out[f"reward/{domain}/invalid_frac"] = float(self.invalid[mask].mean())
        return out


def _spec_key(spec: Any) -> str:
    if callable(spec) and not isinstance(spec, BatchReward):
        return f"callable:{getattr(spec, '__module__', '?')}.{getattr(spec, '__qualname__', repr(spec))}"
    return json.dumps(spec, sort_keys=True, default=repr)


class RewardScorer:
    """Routes samples to rewards by domain and scores them.

    routes: domain -> spec (a registered name, `module:function`, `file.py:function`, a callable, or a weighted
        list `[{"reward": spec, "weight": w}, ...]`); a sample's `reward` key overrides its domain's spec.
    num_workers: worker processes; 0 scores in this process (timeouts enforced by abandoning the call's thread).
    timeout_s: limit on one reward call (one sample; a whole chunk for TRL-style batch rewards).
    on_error: "raise" (RewardError after the batch finishes) or "zero" (0 reward, counted in `errors`, warned
        about; still RewardError once more than `max_error_frac` of one reward's samples have failed, judged
        from `judge_after` samples on, counted since the scorer started).
    load_timeout_s: limit on loading a spec (importing its module), here and in each worker.
    base_dir: folder relative file specs are resolved against (e.g. the config file's folder).
    preload: modules imported in each worker first (ones that `register_reward` the names routes use).
    chunk_size: samples per worker job; default spreads each route's samples over about 4 jobs per worker.
    """

    def __init__(
        self,
        routes: dict[str, Any],
        num_workers: int = 2,
        timeout_s: float = 10,
        on_error: str = "raise",
        base_dir: str | Path | None = None,
        preload: Sequence[str] = (),
        chunk_size: int | None = None,
        load_timeout_s: float = 30.0,
        max_error_frac: float = 0.5,
        warn=None,
        judge_after: int = 8,
    ):
        if on_error not in ("raise", "zero"):
            raise ValueError(f"on_error must be 'raise' or 'zero', got {on_error!r}")
        if num_workers < 0:
            raise ValueError("num_workers must be >= 0")
        if not (timeout_s > 0 and math.isfinite(timeout_s)):
            raise ValueError("timeout_s must be a positive number")
        self.routes = dict(routes)
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.on_error = on_error
        self.base_dir = str(base_dir) if base_dir is not None else None
        self.preload = tuple(preload)
        self.chunk_size = chunk_size
        self.load_timeout_s = float(load_timeout_s)
        self.max_error_frac = float(max_error_frac)
        self.judge_after = int(judge_after)
        self._warn = warn or _warn
        self._warned: set[str] = set()
        self._tally: dict[str, list[int]] = {}  # reward name -> [failed, scored] since this scorer started
        for module in self.preload:
            call_with_timeout(lambda module=module: __import__(module), self.load_timeout_s,
                              f"importing reward module {module!r}")
        self._rewards: dict[str, BatchReward] = {}
        for spec in self.routes.values():  # fail now on a bad spec, not mid-run
            self._reward(spec)
        self._pool: WorkerPool | None = None

    @classmethod
    def from_config(cls, rewards_cfg: Any, **kwargs: Any) -> RewardScorer:
        """The scorer of a job's `rewards` section (`rl.config.RewardsConfig`): training and evaluation build
        theirs here, so both score with the same limits."""
        return cls(rewards_cfg.routes, num_workers=rewards_cfg.num_workers, timeout_s=rewards_cfg.timeout_s,
                   on_error=rewards_cfg.on_error, load_timeout_s=rewards_cfg.load_timeout_s,
                   max_error_frac=rewards_cfg.max_error_frac, **kwargs)

    def _reward(self, spec: Any) -> BatchReward:
        key = _spec_key(spec)
        if key not in self._rewards:
            try:
                reward = call_with_timeout(lambda: get_reward(spec, base_dir=self.base_dir), self.load_timeout_s,
                                           f"loading reward {spec!r:.80}")
            except RewardTimeout as exc:
                raise RewardSpecError(f"{exc}: does its module block at import?") from None
            if self.num_workers > 0:
                try:
                    pickle.dumps(spec)
                except Exception as exc:  # any pickling failure means the same thing here
                    raise RewardSpecError(
                        f"reward spec {spec!r:.80} cannot be sent to worker processes ({exc}); use a registered "
                        "name, 'module:function', 'file.py:function', a module-level function, or num_workers=0"
                    ) from exc
            self._rewards[key] = reward
        return self._rewards[key]

    def _spec_for(self, sample: dict[str, Any], position: int) -> Any:
        if sample.get("reward"):
            return sample["reward"]
        domain = sample.get("domain")
        if domain not in self.routes:
            known = ", ".join(sorted(map(str, self.routes))) or "(none)"
            raise ValueError(
                f"sample {sample.get('id', position)!r}: no reward route for domain {domain!r}; routes: {known}"
            )
        return self.routes[domain]

    def score(self, samples: Sequence[dict[str, Any]], trainer_state: Any = None) -> RewardResult:
        """Rewards for `samples` (dicts with id, domain, prompt, completion, reference, metadata, optional
        reward; and, from `rewards.inputs.reward_requests`, messages, completion_ids and fields). Metadata reaches
        the reward as keyword arguments, plus `domain` unless metadata has its own. `trainer_state` reaches
        TRL-style rewards (`rewards.inputs.RewardTrainerState`)."""
        start = time.monotonic()
        groups: dict[str, list[int]] = {}
        specs: dict[str, Any] = {}
        items: list[tuple[Any, ...]] = []
        for position, sample in enumerate(samples):
            completion = sample.get("completion")
            if not isinstance(completion, str):
                raise TypeError(f"sample {sample.get('id', position)!r}: completion must be a str")
            spec = self._spec_for(sample, position)
            key = _spec_key(spec)
            self._reward(spec)
            specs[key] = spec
            groups.setdefault(key, []).append(position)
            meta = {"domain": sample.get("domain"), **(sample.get("metadata") or {})}
            extras = {"messages": sample.get("messages"), "completion_ids": sample.get("completion_ids"),
                      "fields": sample.get("fields"), "trainer_state": trainer_state}
            items.append((str(sample.get("prompt") or ""), completion, sample.get("reference"), meta, extras))

        outcomes: dict[int, Outcome] = {}
        decided = lambda done: self._decided(groups, done)  # noqa: E731
        if self.num_workers == 0:
            for key, indices in groups.items():
                outcomes.update(self._run_inline(self._rewards[key], indices, items, lambda: decided(outcomes)))
                if decided(outcomes):
                    break
        elif groups:
            outcomes = self._pool_run(groups, specs, items, decided)
        return self._collect(samples, groups, outcomes, time.monotonic() - start)

    def _decided(self, groups: dict[str, list[int]], outcomes: dict[int, Outcome]) -> bool:
        """True once this batch ends in a RewardError whatever its other samples score (on_error=raise: any
        failure; zero: a reward past max_error_frac even if all the rest succeed). The rest is then not waited
        for: a reward that hangs on every sample would otherwise cost timeout_s per sample before the error."""
        for key, indices in groups.items():
            failed = sum(1 for i in indices if i in outcomes and outcomes[i].error)
            if not failed:
                continue
            if self.on_error == "raise":
                return True
            before_failed, before = self._tally.get(self._rewards[key].name, [0, 0])
            total = before + len(indices)
            if total >= self.judge_after and (before_failed + failed) / total > self.max_error_frac:
                return True
        return False

    def _run_inline(self, reward: BatchReward, indices: list[int], items: list, decided=lambda: False
                    ) -> dict[int, Outcome]:
        """In-process scoring, call by call (the units a worker would time), each under `timeout_s`; stops once
        `decided()` says the batch has failed."""
        out: dict[int, Outcome] = {}
        columns = [list(c) for c in zip(*(items[i] for i in indices))]
        for start, end in call_units(reward, len(indices)):
            part = [c[start:end] for c in columns]
            try:
                outcomes = call_with_timeout(lambda part=part: reward.outcomes(*part), self.timeout_s,
                                             f"reward {reward.name!r}")
            except RewardTimeout as exc:
                outcomes = [Outcome(0.0, (), f"timed out after {self.timeout_s:g}s (in-process; the call was "
                                             "abandoned in its thread)")] * (end - start)
                del exc
            except Exception as exc:  # noqa: BLE001 - as a worker reports it
                outcomes = [Outcome(0.0, (), describe_exception(exc))] * (end - start)
            out.update(zip(indices[start:end], outcomes))
            if any(o.error for o in outcomes) and decided():
                break
        return out

    def _pool_run(self, groups: dict[str, list[int]], specs: dict[str, Any], items: list, decided
                  ) -> dict[int, Outcome]:
        if self._pool is None:
            self._pool = WorkerPool(self.num_workers, self.timeout_s, self.base_dir, self.preload,
                                    load_timeout_s=self.load_timeout_s)
        jobs = []
        for key, indices in groups.items():
            size = self.chunk_size or max(1, math.ceil(len(indices) / (4 * self.num_workers)))
            for start in range(0, len(indices), size):
                chunk = indices[start : start + size]
                jobs.append(Job(key, specs[key], chunk, [items[i] for i in chunk]))
        return self._pool.run(jobs, stop=decided)

    def _collect(self, samples, groups, outcomes: dict[int, Outcome], elapsed: float) -> RewardResult:
        n = len(samples)
        rewards, invalid, failed = np.zeros(n), np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        reasons: Counter = Counter()
        errors: list[str] = []
        broken: list[str] = []
        unscored = 0  # samples left unscored because the batch had already failed (`_decided`)
        for key, indices in groups.items():
            name = self._rewards[key].name
            first_error = len(errors)
            for i in indices:
                outcome = outcomes.get(i)
                if outcome is None:
                    failed[i] = True
                    unscored += 1
                    continue
                if outcome.error:
                    failed[i] = True
                    sample = samples[i]
                    errors.append(
                        f"reward {name!r} failed on sample {sample.get('id', i)!r} "
                        f"(completion {truncate(sample['completion'], 80)!r}): {outcome.error}"
                    )
                    continue
                rewards[i] = outcome.value
                if outcome.invalid:
                    invalid[i] = True
                    reasons.update(outcome.invalid)
            failures = len(errors) - first_error
            tally = self._tally.setdefault(name, [0, 0])
            tally[0] += failures
            tally[1] += len(indices)
            if failures and self.on_error == "zero":
                share = f"reward {name!r} failed on {tally[0]} of {tally[1]} samples so far"
                if tally[1] >= self.judge_after and tally[0] / tally[1] > self.max_error_frac:
                    broken.append(f"{share}, more than rewards.max_error_frac={self.max_error_frac:g}: it is broken, "
                                  f"not flaky; latest: {errors[first_error]}")
                elif name not in self._warned:
                    self._warned.add(name)
                    self._warn(f"{share} (on_error=zero: scored 0, counted in reward/error_frac; warned once): "
                               f"{errors[first_error]}")
        if errors and self.on_error == "raise":
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            more += f"; {unscored} other samples were not scored after it" if unscored else ""
            raise RewardError(errors[0] + more, errors)
        if broken:
            raise RewardError("; ".join(broken), errors)
        domains = [str(s.get("domain")) for s in samples]
        return RewardResult(rewards, invalid, reasons, errors, failed, domains, elapsed)

    def close(self) -> None:
        """Stop the worker processes (a later `score` starts new ones)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 - interpreter shutdown: nothing left to report to
            pass
