"""What the fault-injection suite (`bench/fault_suite.py`) and `tests/test_faults.py` share: a tiny workspace, one
short seeded job, `python -m cli train` as a user runs it (optionally killed with -9 at a chosen moment), and the
checks after a fault (every checkpoint verifies, `final` points at a verified one, per-step losses equal a
reference run's, one metrics record per step).

The kill moments are chosen from the outside (elapsed time, a file appearing); the one hook inside the trainer is
`VLPOST_TEST_SAVE_PAUSE` (`rl/checkpoint.py`), which holds a checkpoint at a named stage so that a kill lands there.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=32, intermediate_size=64,
            moe_intermediate_size=32, num_experts=2, experts_per_token=1)
# What "the same losses" compares, per step: the policy loss and every MOPD figure.
LOSS_KEYS_PREFIXES = ("actor/loss", "mopd/")
PAUSE_ENV = "VLPOST_TEST_SAVE_PAUSE"  # rl.checkpoint.TEST_PAUSE_ENV: "<step>:<stage>" holds that save there


def build_workspace(root: Path) -> Path:
    """The embedded tokenizer, a tiny VL-MoE student and two teachers (VL, text-only Qwen3), saved under `root`."""
    import torch

    from models.factory import TinyModelSpec, build_model, save_model
    from tasks.embedded import embedded_tokenizer

    root = Path(root)
    if (root / "teacher_text" / "config.json").exists():
        return root
    torch.set_num_threads(1)
    tok = embedded_tokenizer(root / "data")
    save_model(build_model(TinyModelSpec(family="qwen3_vl_moe", **TINY), tok, seed=1), tok, root / "student")
    save_model(build_model(TinyModelSpec(family="qwen3_vl_moe", **TINY), tok, seed=2), tok, root / "teacher_vl")
    save_model(build_model(TinyModelSpec(family="qwen3", **TINY), tok, seed=3), tok, root / "teacher_text")
    return root


def job_config(ws: Path, name: str, extra: dict[str, Any] | None = None, steps: int = 8, every: int = 2) -> dict:
    """One short seeded MOPD job: a Ray rollout actor, teachers in-process, a checkpoint every `every` steps."""
    data = {"data_dir": str(ws / "data"), "n_train": 16, "n_eval": 4}
    cfg: dict[str, Any] = {
        "run": {"name": name, "dir": str(ws / "runs"), "seed": 3},
        "model": {"path": str(ws / "student"), "tokenizer": "model"},
        "data": {"train": [{"source": "embedded", "args": {**data, "split": "train"}}],
                 "eval": [{"source": "embedded", "args": {**data, "split": "eval"}}], "prompts_per_step": 4},
        "rollout": {"backend": "hf", "num_workers": 1, "threads_per_worker": 1, "group_size": 2, "max_new_tokens": 6},
        "teachers": [
            {"name": "vl", "path": str(ws / "teacher_vl"), "domains": ["video"], "num_workers": 0},
            {"name": "text", "path": str(ws / "teacher_text"), "domains": ["retrieval", "tool", "reasoning"],
             "view": "text", "num_workers": 0},
        ],
        "algorithm": {"advantage": "mopd", "policy_loss": "gspo_token"},
        "rewards": {"num_workers": 0},
        "optim": {"lr": 1e-3},
        "trainer": {"steps": steps, "checkpoint_every": every, "keep_checkpoints": 2, "micro_batch_size": 3,
                    "eval_at_start": False, "eval_teachers": False, "threads": 1},
        "eval": {"max_new_tokens": 6},
        "logging": {"progress": False, "tensorboard": False},
    }
    for key, value in (extra or {}).items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def write_job(ws: Path, name: str, cfg: dict) -> Path:
    path = Path(ws) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_dir(cfg: dict) -> Path:
    return Path(cfg["run"]["dir"]) / cfg["run"]["name"]


# ---------------------------------------------------------------------- running `train` as a user does


@dataclass
class Outcome:
    """One `python -m cli train` process: how it ended and what it printed."""

    rc: int | None  # None: still running when killed by us (rc then is -9)
    output: str
    seconds: float
    killed_at: str = ""  # what the kill landed on, when we killed it
    pids_killed: list[int] = field(default_factory=list)

    def error_lines(self) -> list[str]:
        return [line for line in self.output.splitlines() if line.startswith("error: ")]

    def has_traceback(self) -> bool:
        return "Traceback (most recent call last)" in self.output


def train_command(config: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "cli", "train", str(config), *overrides]


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VLPOST_TRACEBACK", PAUSE_ENV)}
    env.update({"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0", "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


def train(config: Path, *overrides: str, timeout_s: float = 600, env: dict[str, str] | None = None) -> Outcome:
    """Run `train` to its end; a run past `timeout_s` is killed and reported as a hang (rc None)."""
    t0 = time.monotonic()
    log = Path(config).with_suffix(f".{time.time_ns()}.log")
    with log.open("w") as out:
        proc = subprocess.Popen(train_command(config, *overrides), cwd=ROOT, env=_env(env), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc = None
    return Outcome(rc, log.read_text(), time.monotonic() - t0)


def train_and_kill(config: Path, when: KillWhen, *overrides: str, env: dict[str, str] | None = None,
                   timeout_s: float = 600, target: str = "trainer") -> Outcome:
    """Start `train` and kill -9, at the moment `when` says, the trainer (`target="trainer"`: the outcome is
    returned at once) or its Ray actors (`"actors"`: the run goes on to whatever end it reaches, within
    `timeout_s`, else it is reported as a hang, rc None). A moment that never comes lets the run end."""
    t0 = time.monotonic()
    log = Path(config).with_suffix(f".{time.time_ns()}.log")
    landed, killed = "", []
    with log.open("w") as out:
        proc = subprocess.Popen(train_command(config, *overrides), cwd=ROOT, env=_env(env), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        while proc.poll() is None and time.monotonic() - t0 < timeout_s:
            if not landed and (landed := when.due(time.monotonic() - t0, log)):
                if target == "trainer":
                    killed = _kill_group(proc)
                    return Outcome(None, log.read_text(), time.monotonic() - t0, landed, killed)
                killed = actor_pids(proc.pid)
                for pid in killed:
                    os.kill(pid, signal.SIGKILL)
            time.sleep(when.poll_s)
        rc = proc.poll()
        if rc is None:
            _kill_group(proc)
    return Outcome(rc, log.read_text(), time.monotonic() - t0, landed or "the run ended first", killed)


def _kill_group(proc: subprocess.Popen) -> list[int]:
    """kill -9 the trainer process, as a user or a scheduler would. Its Ray actors watch it and end themselves;
    the rest of the local Ray instance it started (its own process group: this run's only) is ended with it."""
    try:
        os.kill(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    if group_members(proc.pid):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return [proc.pid]


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(ppid, pgrp, state) of a live process, None when gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), int(fields[2]), fields[0]


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group `pgid`."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) and st[1] == pgid and st[2] != "Z":
            out.append(int(entry.name))
    return out


def actor_pids(pgid: int) -> list[int]:
    """The Ray actors (`ray::HostActor`) of the run whose trainer leads process group `pgid`: children of that
    run's own raylet, so never another job's."""
    raylets = set(group_members(pgid))
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or not (st := _stat(int(entry.name))) or st[0] not in raylets:
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith("ray::HostActor"):
            out.append(int(entry.name))
    return sorted(out)


@dataclass
class KillWhen:
    """A kill moment, the first condition set decides: `after_s` seconds into the run; `delay_s` after the
    metrics record of step `record_step` appears (written by this run: one left by a killed run counts only once
    the resumed run has dropped it and written it again); as soon as `path_glob` exists under `watch`; once the log says
    `log_text` (e.g. the line of a test pause)."""

    after_s: float | None = None
    record_step: int | None = None
    delay_s: float = 0.0
    watch: Path | None = None
    path_glob: str = ""
    log_text: str = ""
    poll_s: float = 0.005
    _seen: float | None = None
    _stale: bool | None = None  # the record was already there at the start (from before the last kill)

    def due(self, elapsed: float, log: Path) -> str:
        if self.after_s is not None and elapsed >= self.after_s:
            return f"t={elapsed:.2f}s"
        if self.record_step is not None and self.watch is not None:
            present = _has_record(self.watch / "metrics.jsonl", self.record_step)
            if self._stale is None:
                self._stale = present
            elif self._stale and not present:  # the resumed run dropped it (it repeats that step): now wait anew
                self._stale = False
            if self._seen is None and present and not self._stale:
                self._seen = elapsed
            if self._seen is not None and elapsed - self._seen >= self.delay_s:
                return f"{elapsed - self._seen:.3f}s after step {self.record_step}'s record"
        if self.path_glob and self.watch is not None and self.watch.exists():
            hits = sorted(p.name for p in self.watch.glob(self.path_glob))
            if hits:
                return f"{hits[0]} present"
        if self.log_text and self.log_text in log.read_text():
            return self.log_text
        return ""


def _has_record(path: Path, step: int) -> bool:
    try:
        return f'{{"step": {step},' in path.read_text()
    except OSError:
        return False


# ---------------------------------------------------------------------- checks after a fault


def step_records(run: Path) -> list[dict[str, float]]:
    path = Path(run) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(run: Path) -> dict[int, dict[str, float]]:
    """step -> the loss figures of that step (`actor/loss`, `mopd/*`)."""
    return {int(r["step"]): {k: v for k, v in r.items() if k.startswith(LOSS_KEYS_PREFIXES)} for r in step_records(run)}


def loss_difference(reference: dict[int, dict[str, float]], got: dict[int, dict[str, float]]) -> float:
    """The largest absolute difference of any loss figure at any step; inf when steps or keys differ."""
    if sorted(reference) != sorted(got):
        return math.inf
    worst = 0.0
    for step, ref in reference.items():
        if sorted(ref) != sorted(got[step]):
            return math.inf
        for key, value in ref.items():
            other = got[step][key]
            if math.isnan(value) and math.isnan(other):
                continue
            worst = max(worst, abs(value - other))
    return worst


def checkpoint_problems(run: Path) -> list[str]:
    """What is wrong with the run's checkpoints on disk: a `step_*` folder that does not verify, a `final` that
    points at a missing or unverified checkpoint."""
    from rl.checkpoint import list_checkpoints, verify_checkpoint

    problems = [f"{folder.name}: {p}" for _, folder in list_checkpoints(run) if (p := verify_checkpoint(folder))]
    final = Path(run) / "final"
    if final.is_symlink() or final.exists():
        target = final.resolve()
        if not target.is_dir():
            problems.append(f"final -> {target.name}: missing")
        elif p := verify_checkpoint(target):
            problems.append(f"final -> {target.name}: {p}")
    return problems


def one_record_per_step(run: Path, steps: int) -> bool:
    return [int(r["step"]) for r in step_records(run)] == list(range(1, steps + 1))


# A reward module whose functions fail in each way a user's reward can: raise, hang, NaN, a non-number, now and then.
BAD_REWARDS = '''
import math, time

CALLS = [0]

def raises(completion, reference, **meta):
    raise ValueError("the reward has a bug")

def hangs(completion, reference, **meta):
    time.sleep(3600)

def nan(completion, reference, **meta):
    return math.nan

def word(completion, reference, **meta):
    return "good"

def flaky(completion, reference, **meta):
    CALLS[0] += 1
    if CALLS[0] % 5 == 0:
        raise ValueError("every fifth call fails")
    return 1.0
'''
