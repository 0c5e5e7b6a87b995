"""Reward registry and spec loading: every reward, whatever its signature, becomes one `BatchReward`.

A spec is a registered name (`temporal_iou`), an importable `package.module:function`, a file
`path/to/file.py:function` (relative paths resolved against `base_dir`, e.g. the config file's folder), a callable,
or a weighted list `[{"reward": spec, "weight": w}, ...]` (see `rewards.format.combine`).

Three user signatures are accepted, told apart by parameter names:

- native per-sample: `fn(completion: str, reference, **meta) -> float` (a `prompt` parameter, when declared, gets
  the prompt); the built-ins use this;
- TRL-style batch: `fn(prompts, completions, completion_ids, trainer_state, **columns) -> list[float]` (detected
  by a `completions` or `completion_ids` parameter), TRL's calling convention in full (`rewards.inputs`): chat
  prompts make completions `[{"role": "assistant", "content": ...}]`; columns are every task field, every
  metadata key (None where a sample lacks it) and the reference as `reference` / `solution` / `ground_truth`;
- verl-style: `compute_score(data_source, solution_str, ground_truth, extra_info) -> float | {"score": float}`
  (detected by `solution_str`); `data_source` is `meta["data_source"]`, else `meta["domain"]`; `extra_info` is meta.

A function declaring only some of the keys gets only those; one with `**kwargs` gets them all. A TRL-style
function that raises InvalidAnswer marks its whole batch invalid; a None in its returned list is TRL's "not
applicable": that sample scores 0 and is counted invalid.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from core.registry import Registry
from rewards.errors import InvalidAnswer, RewardError, RewardSpecError
from rewards.inputs import trl_columns, trl_prompts_and_completions


class Outcome(NamedTuple):
    """The fate of one sample under one reward: a value, or why it is invalid (model's fault), or an error
    (reward's fault). `invalid` holds "reward: reason" strings (several when a combined reward has several
    invalid parts); a sample with an error has value 0.0."""

    value: float
    invalid: tuple[str, ...] = ()
    error: str | None = None


def describe_exception(exc: BaseException) -> str:
    """`Type: message (at file:line)` of the innermost frame, short enough for a log line."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def check_value(value: Any) -> float:
    """The value as a finite float, or ValueError saying why it is not a reward (None, a string, NaN, inf)."""
    if isinstance(value, dict) and "score" in value:  # verl allows {"score": x, ...}
        value = value["score"]
    if value is None or isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
        raise ValueError(f"returned {type(value).__name__} {value!r:.60}, not a number")
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"returned {type(value).__name__} {value!r:.60}, not a number ({exc})") from None
    if not math.isfinite(number):
        raise ValueError(f"returned non-finite value {number}")
    return number


class BatchReward:
    """The one interface the scorer sees: `reward(prompts, completions, references, metas) -> list[float]`.

    `batched` is True when the underlying function takes the whole batch in one call (TRL-style); per-sample
    rewards are then called once per sample, which is also the unit the scorer's timeout applies to.
    """

    name: str = "reward"
    batched: bool = False

    def outcomes(
        self, prompts: Sequence[str], completions: Sequence[str], references: Sequence[Any], metas: Sequence[dict],
        extras: Sequence[dict] | None = None,
    ) -> list[Outcome]:  # pragma: no cover - interface
        """`extras[i]`: what only TRL-style rewards read (`messages`, `completion_ids`, `fields`, `trainer_state`;
        see `rewards.inputs`); None when the caller has none."""
        raise NotImplementedError

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], references: Sequence[Any], metas: Sequence[dict],
        extras: Sequence[dict] | None = None,
    ) -> list[float]:
        """Rewards `[B]`; invalid answers give 0.0; any error raises `RewardError` naming the reward and index."""
        results = self.outcomes(prompts, completions, references, metas, extras)
        errors = [f"reward {self.name!r} failed on sample {i}: {o.error}" for i, o in enumerate(results) if o.error]
        if errors:
            raise RewardError(errors[0] + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""), errors)
        return [o.value for o in results]


def call_units(reward: BatchReward, n: int) -> list[tuple[int, int]]:
    """The calls `n` samples are scored in: one per sample, or all at once for batched rewards (the unit a
    timeout applies to, in a worker process and in-process alike)."""
    return [(0, n)] if reward.batched else [(i, i + 1) for i in range(n)]


def _accepts(fn: Callable) -> tuple[set[str], bool]:
    """Parameter names of `fn` and whether it takes `**kwargs`."""
    params = inspect.signature(fn).parameters.values()
    names = {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def detect_style(fn: Callable) -> str:
    """'native', 'trl' or 'verl' from the parameter names; RewardSpecError when none fits."""
    try:
        names, _ = _accepts(fn)
    except (TypeError, ValueError) as exc:
        raise RewardSpecError(f"cannot read the signature of {fn!r}: {exc}") from exc
    if "completions" in names or "completion_ids" in names:
        return "trl"
    if "solution_str" in names:
        return "verl"
    if "completion" in names:
        return "native"
    raise RewardSpecError(
        f"reward function {getattr(fn, '__qualname__', fn)!r} has parameters {sorted(names)}; expected "
        "fn(completion, reference, **meta), fn(prompts, completions, **kwargs) (or completion_ids) or "
        "compute_score(data_source, solution_str, ground_truth, extra_info)"
    )


def _select(kwargs: dict[str, Any], names: set[str], var_kw: bool) -> dict[str, Any]:
    return kwargs if var_kw else {k: v for k, v in kwargs.items() if k in names}


class FunctionReward(BatchReward):
    """Adapts a plain function of any of the three signatures."""

    def __init__(self, fn: Callable, name: str | None = None):
        self.fn = fn
        self.style = detect_style(fn)
        self.name = name or getattr(fn, "__qualname__", repr(fn))
        self.batched = self.style == "trl"
        self._names, self._var_kw = _accepts(fn)

    def __repr__(self) -> str:
        return f"FunctionReward({self.name!r}, style={self.style})"

    def _one(self, prompt: str, completion: str, reference: Any, meta: dict) -> Any:
        if self.style == "verl":
            kwargs = {
                "data_source": meta.get("data_source", meta.get("domain", "")),
                "solution_str": completion,
                "ground_truth": reference,
                "extra_info": meta,
            }
            return self.fn(**_select(kwargs, self._names, self._var_kw))
        kwargs = {**meta, "reference": reference}
        if "prompt" in self._names:
            kwargs["prompt"] = prompt
        kwargs.pop("completion", None)
        return self.fn(completion, **_select(kwargs, self._names, self._var_kw))

    def outcomes(self, prompts, completions, references, metas, extras=None) -> list[Outcome]:
        if self.batched:
            return self._batch(prompts, completions, references, metas, extras)
        results = []
        for prompt, completion, reference, meta in zip(prompts, completions, references, metas):
            try:
                raw = self._one(prompt, completion, reference, meta)
            except InvalidAnswer as exc:
                results.append(Outcome(0.0, (f"{self.name}: {exc.reason}",)))
                continue
            except Exception as exc:  # noqa: BLE001 - any bug in a reward becomes a reported error
                results.append(Outcome(0.0, (), describe_exception(exc)))
                continue
            try:
                results.append(Outcome(check_value(raw)))
            except ValueError as exc:
                results.append(Outcome(0.0, (), str(exc)))
        return results

    def _batch(self, prompts, completions, references, metas, extras=None) -> list[Outcome]:
        n = len(completions)
        extras = list(extras) if extras is not None else [{} for _ in range(n)]
        trl_prompts, trl_completions = trl_prompts_and_completions(prompts, completions, extras)
        ids = [e.get("completion_ids") for e in extras]
        kwargs = {
            **trl_columns(references, metas, extras),
            "prompts": trl_prompts, "completions": trl_completions,
            "completion_ids": ids if all(i is not None for i in ids) else None,
            "trainer_state": next((e["trainer_state"] for e in extras if e.get("trainer_state") is not None), None),
        }
        try:
            values = self.fn(**_select(kwargs, self._names, self._var_kw))
        except InvalidAnswer as exc:
            return [Outcome(0.0, (f"{self.name}: {exc.reason}",))] * n
        except Exception as exc:  # noqa: BLE001
            return [Outcome(0.0, (), describe_exception(exc))] * n
        try:
            values = list(values)
        except TypeError:
            return [Outcome(0.0, (), f"returned {type(values).__name__}, not a list of {n} numbers")] * n
        if len(values) != n:
            return [Outcome(0.0, (), f"returned {len(values)} values for a batch of {n}")] * n
        results = []
        for value in values:
            if value is None:  # TRL: this reward does not apply to the sample
                results.append(Outcome(0.0, (f"{self.name}: returned None (not applicable)",)))
                continue
            try:
                results.append(Outcome(check_value(value)))
            except ValueError as exc:
                results.append(Outcome(0.0, (), str(exc)))
        return results


@dataclass(frozen=True)
class RegisteredReward:
    name: str
    description: str
    fn: Callable


REWARDS: Registry[RegisteredReward] = Registry("reward")


def register_reward(name: str, description: str) -> Callable[[Callable], Callable]:
    """Decorator: make `fn` reachable by `name` from YAML. `description` is the one line `rewards list` prints.
    The signature is checked now, so a wrong one fails at import, not mid-run."""
    if not description or "\n" in description:
        raise ValueError(f"reward {name!r}: description must be one non-empty line")

    def wrap(fn: Callable) -> Callable:
        detect_style(fn)
        REWARDS.register(name, RegisteredReward(name, description, fn))
        return fn

    return wrap


def list_rewards() -> list[tuple[str, str]]:
    """(name, one-line description) of every registered reward, sorted by name."""
    return [(name, REWARDS.get(name).description) for name in REWARDS.names()]


def format_reward_table() -> str:
    """The registered rewards as an aligned two-column text table (for `rewards list`)."""
    rows = [("name", "description")] + list_rewards()
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {desc}" for name, desc in rows]
    lines.insert(1, f"{'-' * width}  {'-' * max(len(desc) for _, desc in rows)}")
    return "\n".join(lines)


def _load_file(path: Path, spec: str) -> Any:
    """Import a .py file once per process under a name derived from its absolute path."""
    if not path.is_file():
        raise RewardSpecError(f"reward spec {spec!r}: file {path} does not exist")
    module_name = "_reward_plugin_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    if module_name in sys.modules:
        return sys.modules[module_name]
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise RewardSpecError(f"reward spec {spec!r}: cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module
    try:
        loader_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise RewardSpecError(f"reward spec {spec!r}: importing {path} failed: {describe_exception(exc)}") from exc
    return module


def resolve_function(spec: str, base_dir: str | Path | None = None) -> tuple[Callable, str]:
    """The raw function a string spec names, and its display name."""
    if not isinstance(spec, str) or not spec.strip():
        raise RewardSpecError(f"reward spec {spec!r} is not a non-empty string")
    spec = spec.strip()
    if ":" not in spec:
        if spec not in REWARDS:
            raise RewardSpecError(REWARDS.unknown(spec))
        return REWARDS.get(spec).fn, spec
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise RewardSpecError(f"reward spec {spec!r}: expected 'module:function' or 'file.py:function'")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target).expanduser()
        if not path.is_absolute():
            path = Path(base_dir or Path.cwd()) / path
        module = _load_file(path.resolve(), spec)
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise RewardSpecError(f"reward spec {spec!r}: importing module {target!r} failed: {exc}") from exc
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise RewardSpecError(f"reward spec {spec!r}: {target!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise RewardSpecError(f"reward spec {spec!r}: {attr!r} is a {type(fn).__name__}, not a function")
    return fn, spec


def get_reward(spec: Any, base_dir: str | Path | None = None) -> BatchReward:
    """The `BatchReward` for `spec`: a registered name, `module:function`, `file.py:function` (relative to
    `base_dir`, default the working directory), a callable, a `BatchReward`, or a weighted list
    `[{"reward": spec, "weight": w}, ...]` (also `[(spec, w), ...]`)."""
    if isinstance(spec, BatchReward):
        return spec
    if isinstance(spec, (list, tuple)):
        from rewards.format import combine

        return combine(spec, base_dir=base_dir)
    if isinstance(spec, dict):
        from rewards.format import combine

        return combine([spec], base_dir=base_dir)
    if callable(spec):
        return FunctionReward(spec)
    fn, name = resolve_function(spec, base_dir)
    try:
        return FunctionReward(fn, name)
    except RewardSpecError as exc:
        raise RewardSpecError(f"reward spec {spec!r}: {exc}") from exc
