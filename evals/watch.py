"""`eval --watch RUN_DIR`: score every checkpoint of a run as it appears, exactly once, surviving restarts.

Run layout (written by the trainer): `checkpoints/step_000100/` directories appear by atomic rename, so a
directory whose name is exactly `step_<digits>` is complete (temp names never match). Results go to
`eval/<step:06d>.json` (the trainer's own naming), `eval/summary.json` (the trainer's summary schema: each domain
first vs last step beside its teachers) and the watcher's own `eval/watch_state.json`. A checkpoint counts as
scored once its result file exists; that file is written (atomically) before the state file, so a crash in
between can never lead to scoring it twice.

Rotation (`trainer.keep_checkpoints`) may delete a checkpoint before or while it is scored: either way it is
skipped with a log line, and `expected_steps` (the run's checkpoint cadence) lets the watcher name the
checkpoints it never saw at all. `finished` (the run has ended: `final` points at its last step) ends the watch
once every checkpoint is scored.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any
from collections.abc import Callable

CHECKPOINT_DIR = re.compile(r"step_(\d+)")
STATE_FILE = "watch_state.json"
SUMMARY_FILE = "summary.json"

EvaluateFn = Callable[[Path], dict[str, Any]]


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write JSON through a temp file and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Completed checkpoints `(step, dir)` in step order."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = CHECKPOINT_DIR.fullmatch(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def result_path(run_dir: Path, step: int, results_dir: str = "eval") -> Path:
    """Where the eval result of `step` lives: `eval/000100.json`."""
    return Path(run_dir) / results_dir / f"{step:06d}.json"


def load_results(run_dir: Path, results_dir: str = "eval") -> list[dict[str, Any]]:
    """Every `eval/<step>.json` of the run, by step."""
    eval_dir = Path(run_dir) / results_dir
    results = []
    if eval_dir.is_dir():
        for path in eval_dir.glob("*.json"):
            if path.stem.isdigit():
                results.append(json.loads(path.read_text(encoding="utf-8")))
    return sorted(results, key=lambda r: r["step"])


def summarize(results: list[dict[str, Any]], run_dir: Path | str = "") -> dict[str, Any]:
    """`summary.json` content: per domain the student at the first and last step, its teachers and the retention
    (last student / best teacher), in the same keys the trainer writes."""
    history = sorted(results, key=lambda r: r["step"])
    if not history:
        return {"run": str(run_dir), "domains": {}}
    first, last = history[0], history[-1]
    domains: dict[str, Any] = {}
    for domain, entry in last.get("domains", {}).items():
        row: dict[str, Any] = {
            "student_before": first.get("domains", {}).get(domain, {}).get("mean_reward"),
            "student_after": entry["mean_reward"], "n": entry.get("n"),
            "before_step": first["step"], "after_step": last["step"],
        }
        teachers = {name: rep[domain]["mean_reward"] for name, rep in (last.get("teachers") or {}).items()
                    if domain in rep}
        if teachers:
            row["teachers"] = teachers
            row["teacher"] = max(teachers.values())
            row["retention"] = entry["mean_reward"] / row["teacher"] if row["teacher"] else None
        domains[domain] = row
    return {"run": str(run_dir), "domains": domains}


def _being_removed(path: Path, grace_s: float = 2.0) -> bool:
    """Whether a checkpoint that failed to load is going away (rotation deletes it file by file, so it may still
    exist for a moment): it is gone, or goes within `grace_s`."""
    deadline = time.monotonic() + grace_s
    while path.exists():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _load_state(run_dir: Path, results_dir: str) -> dict[str, Any]:
    path = Path(run_dir) / results_dir / STATE_FILE
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    return {"scored": {}}


def run_finished(run_dir: Path, steps: int) -> bool:
    """The trainer has ended the run: `final` links to a checkpoint of step >= `steps` (`trainer.steps`)."""
    final = Path(run_dir) / "final"
    if not final.is_symlink() and not final.exists():
        return False
    match = CHECKPOINT_DIR.fullmatch(Path(os.readlink(final)).name if final.is_symlink() else final.name)
    return bool(match) and int(match.group(1)) >= steps


def cadence_steps(checkpoint_every: int, eval_every: int, steps: int) -> Callable[[int], set[int]]:
    """The steps a run checkpoints up to a given step: 0, every `checkpoint_every`, every evaluated step
    (`eval_every`) and the last (`steps`); what the watcher expects to have seen."""
    def expected(up_to: int) -> set[int]:
        found = {0}
        for every in (checkpoint_every, eval_every):
            if every:
                found.update(range(every, min(up_to, steps) + 1, every))
        if up_to >= steps:
            found.add(steps)
        return {s for s in found if s <= up_to}

    return expected


def watch(run_dir: str | Path, evaluate_fn: EvaluateFn, poll_s: float = 30.0, stop_after: int | None = None,
          max_idle_s: float | None = None, results_dir: str = "eval",
          log: Callable[[str], None] = print, finished: Callable[[], bool] | None = None,
          expected_steps: Callable[[int], set[int]] | None = None) -> list[dict[str, Any]]:
    """Poll `run_dir/checkpoints` and score each new checkpoint with `evaluate_fn(checkpoint_dir) -> dict`.

    stop_after: return after scoring this many checkpoints in this call (None: keep watching).
    max_idle_s: also return when no new checkpoint appeared for this long (None: wait forever).
    results_dir: folder under the run for results (another name keeps benchmark results apart from the
    trainer's in-loop eval, which also writes `eval/<step>.json`).
    A checkpoint deleted before its turn or while being scored (checkpoint rotation) is skipped and logged, not
    marked scored; with `expected_steps(newest_seen_step)`, steps the watcher never saw are logged too.
    finished: return once it is true and every checkpoint listed after it became true is scored (the run ended).
    Returns the results scored in this call. `step` and `checkpoint` are filled in when the result lacks them.
    """
    run_dir = Path(run_dir)
    out = run_dir / results_dir
    state = _load_state(run_dir, results_dir)
    scored_now: list[dict[str, Any]] = []
    seen: set[int] = {int(step) for step in state["scored"]}
    reported: set[int] = set()
    idle_since = time.monotonic()
    while True:
        ended = finished is not None and finished()  # before listing: a checkpoint saved after it is listed
        pending = []
        for step, path in list_checkpoints(run_dir):
            seen.add(step)
            if str(step) in state["scored"]:
                continue
            if result_path(run_dir, step, results_dir).is_file():  # written before a crash: counts as scored
                state["scored"][str(step)] = str(path)
            else:
                pending.append((step, path))
        if expected_steps is not None and seen:
            missed = sorted(expected_steps(max(seen)) - seen - reported)
            if missed:
                reported.update(missed)
                log(f"[watch] checkpoint(s) of step {', '.join(map(str, missed))} were rotated away before this "
                    "watcher saw them (not scored): keep more (trainer.keep_checkpoints) or poll faster (--poll)")
        for step, path in pending:
            if not path.is_dir():
                log(f"[watch] {path} was removed before it could be scored; skipped")
                continue
            log(f"[watch] scoring {path}")
            try:
                result = dict(evaluate_fn(path))
            except Exception:
                if not _being_removed(path):
                    raise
                log(f"[watch] {path} was removed while it was being scored (checkpoint rotation); skipped")
                continue
            result.setdefault("step", step)
            result.setdefault("checkpoint", str(path))
            atomic_write_json(result_path(run_dir, step, results_dir), result)
            state["scored"][str(step)] = str(path)
            atomic_write_json(out / STATE_FILE, state)
            atomic_write_json(out / SUMMARY_FILE, summarize(load_results(run_dir, results_dir), run_dir))
            scored_now.append(result)
            idle_since = time.monotonic()
            if stop_after is not None and len(scored_now) >= stop_after:
                return scored_now
        if ended:
            log(f"[watch] the run has ended; scored {len(scored_now)} checkpoint(s) in this watch")
            return scored_now
        if max_idle_s is not None and time.monotonic() - idle_since >= max_idle_s:
            return scored_now
        time.sleep(poll_s)
