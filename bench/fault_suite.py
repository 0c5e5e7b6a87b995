"""The fault-injection suite: faults a training job meets, each injected into a short seeded MOPD run started as a
user starts it (`python -m cli train CONFIG`), then classified.

    python bench/fault_suite.py                  # 20 kill -9 moments + every other fault (~12 min on 2 cores)
    python bench/fault_suite.py --quick          # 4 kill moments
    python bench/fault_suite.py --kills 40 --chain 5 --out runs/fault_suite/summary.md

- kill -9 of the trainer at seeded moments spread over the run: during start-up, a random delay after a step's
  record, while a checkpoint folder is being written (`.tmp_step_*` appears), or held by the test-only pause at a
  stage of the save (written / manifest / renamed). Each kill is followed by the same `train` command. Kills are
  chained (`--chain` kills per run folder, the command rerun after each, the last rerun goes to the end), so every
  rerun after the first is itself a resumed run that may be killed. After each kill: every `step_*` folder verifies
  and `final` (if any) points at a verified one; after each rerun: every per-step loss (`actor/loss`, `mopd/*`)
  equals the uninterrupted run's, one record per step.
- a rollout actor / a teacher actor killed mid-step; the newest checkpoint truncated / one byte flipped;
  a reward (`file.py:fn` route) that raises, hangs past `rewards.timeout_s`, returns NaN, returns a string, or fails
  now and then under `on_error: zero`; a `video_files` JSONL with a broken line; a missing / corrupt / every video.

Each ends in: "recovered" (exit 0, the run's losses equal the reference), "named error" (exit 1, one `error: ...`
line, no traceback), "counted" (exit 0, the bad inputs scored 0 or skipped and counted in the metrics), or a
failure of the suite ("hang", "traceback", "losses differ", "damaged checkpoint"). The table is printed and
written to `--out`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import fault_kit as kit  # noqa: E402

STEPS, EVERY = 8, 2
PAUSE_STAGES = ("written", "manifest", "renamed")


@dataclass
class Row:
    fault: str
    happened: str
    lost: str  # steps whose result is missing at the end ("0", or "-" where the run was refused)
    equal: str  # resumed losses equal the reference: "yes (0.0)", "no (1e-3)", "-"
    seconds: float
    ok: bool

    def cells(self) -> list[str]:
        return [self.fault, self.happened, self.lost, self.equal, f"{self.seconds:.0f}", "ok" if self.ok else "FAIL"]


# ---------------------------------------------------------------------- kill -9 moments


@dataclass
class Moment:
    """Where in the run a kill lands: `position` orders moments within one run folder (the integer part is the
    step whose record or checkpoint it follows)."""

    kind: str  # startup | record | writing | pause
    step: int
    value: float | str = 0.0  # startup: seconds; record: delay after the record; pause: the stage

    @property
    def mid_checkpoint(self) -> bool:
        return self.kind in ("writing", "pause")

    def describe(self) -> str:
        if self.kind == "startup":
            return f"start-up, t={self.value:.1f}s"
        if self.kind == "record":
            return f"{self.value * 1000:.0f} ms after step {self.step}'s record"
        if self.kind == "writing":
            return f"as soon as .tmp_step_{self.step:06d} appears"
        return f"checkpoint step {self.step} held at '{self.value}'"

    def when(self, run: Path) -> tuple[kit.KillWhen, dict[str, str]]:
        if self.kind == "startup":
            return kit.KillWhen(after_s=float(self.value)), {}
        if self.kind == "record":
            return kit.KillWhen(record_step=self.step, delay_s=float(self.value), watch=run), {}
        if self.kind == "writing":
            return kit.KillWhen(watch=run / "checkpoints", path_glob=f".tmp_step_{self.step:06d}", poll_s=0.001), {}
        return (kit.KillWhen(log_text=f"test pause: checkpoint step {self.step} at {self.value}"),
                {"VLPOST_TEST_SAVE_PAUSE": f"{self.step}:{self.value}"})


def kill_moments(n: int, chain: int, seed: int) -> list[list[Moment]]:
    """`n` seeded moments in chains of `chain` (one run folder each), strictly later step by step within a chain
    so that each is still ahead of the resumed run. About 40% land inside a checkpoint save."""
    rng = random.Random(seed)
    chains = []
    left = n
    while left > 0:
        size = min(chain, left)
        steps = sorted(rng.sample(range(STEPS + 1), size))
        moments = []
        for s in steps:
            draw = rng.random()
            if s == 0:
                kind = "startup" if draw < 0.4 else "writing" if draw < 0.7 else "pause"
            elif s % EVERY == 0:
                kind = "record" if draw < 0.4 else "writing" if draw < 0.7 else "pause"
            else:
                kind = "record"
            value: float | str = {"startup": round(rng.uniform(1.0, 8.0), 1), "record": round(rng.uniform(0, 0.15), 3),
                                  "writing": 0.0, "pause": rng.choice(PAUSE_STAGES)}[kind]
            moments.append(Moment(kind, s, value))
        chains.append(moments)
        left -= size
    return chains


def partial_difference(reference: dict, got: dict) -> float:
    """Largest loss difference over the steps `got` has (inf if a step is not in the reference)."""
    return kit.loss_difference({s: reference[s] for s in got if s in reference}, got) if set(got) <= set(reference) \
        else math.inf


def resumed_from(output: str) -> str:
    m = re.search(r"resumed .* from (step_\d+)", output)
    return m.group(1) if m else "a fresh start"


def kill_sweep(ws: Path, reference: dict, n: int, chain: int, seed: int) -> tuple[list[Row], dict]:
    rows: list[Row] = []
    stats = {"kills": 0, "mid_checkpoint": 0, "exact": 0, "max_diff": 0.0, "damaged": 0}
    for c, moments in enumerate(kill_moments(n, chain, seed)):
        name = f"kill_chain{c}"
        cfg = kit.job_config(ws, name, steps=STEPS, every=EVERY)
        config, run = kit.write_job(ws, name, cfg), kit.run_dir(cfg)
        pending: list[Row] = []  # the row of the last kill, waiting for the rerun that follows it
        for moment in [*moments, None]:
            if moment is None:
                out = kit.train(config, timeout_s=600)
            else:
                when, env = moment.when(run)
                out = kit.train_and_kill(config, when, env=env)
            damaged = kit.checkpoint_problems(run)
            diff = partial_difference(reference, kit.losses(run))
            for row in pending:  # the rerun after a kill is now done (or killed in turn): judge the kill
                row.happened += f"; rerun resumed from {resumed_from(out.output)}"
                row.equal = "yes (0.0)" if diff == 0 else f"no ({diff:.1e})"
                row.ok = row.ok and diff == 0.0
                stats["exact"] += diff == 0.0
                stats["max_diff"] = max(stats["max_diff"], diff)
            pending = []
            if moment is None:
                lost = STEPS - len(kit.losses(run))
                complete = out.rc == 0 and kit.one_record_per_step(run, STEPS) and not damaged
                rows.append(Row(f"kill chain {c}: final rerun", f"exit {out.rc}, {len(kit.losses(run))} steps, "
                                f"final -> {(run / 'final').resolve().name}", str(lost),
                                f"{'yes' if diff == 0 else 'no'} ({diff:.1e})", out.seconds, complete and diff == 0))
                continue
            stats["kills"] += 1
            stats["mid_checkpoint"] += moment.mid_checkpoint
            stats["damaged"] += bool(damaged)
            landed = out.killed_at if out.rc is None else f"not reached: the run ended first (exit {out.rc})"
            happened = f"killed at {landed}" + (f"; DAMAGED: {damaged}" if damaged else "")
            row = Row(f"kill -9 #{stats['kills']}: {moment.describe()}", happened, "0", "-", out.seconds,
                      out.rc is None and not damaged)
            rows.append(row)
            pending.append(row)
        print("\n".join(" | ".join(r.cells()) for r in rows[-len(moments) - 1:]), flush=True)
    return rows, stats


# ---------------------------------------------------------------------- the other faults


def classify(out: kit.Outcome, expect: str, run: Path | None = None, reference: dict | None = None,
             counter: str = "") -> tuple[str, bool]:
    """What happened, and whether it is what the suite requires (`expect`: error | recovered | counted)."""
    if out.rc is None:
        return f"HANG (killed after {out.seconds:.0f}s)", False
    if out.has_traceback():
        return f"exit {out.rc} with a bare traceback", False
    errors = out.error_lines()
    if out.rc != 0:
        text = errors[0] if len(errors) == 1 else f"{len(errors)} error lines: {errors[:2]}"
        return f"exit {out.rc}: `{text[:220]}`", expect == "error" and out.rc == 1 and len(errors) == 1
    if expect == "counted":
        total = max((r.get(counter, 0.0) for r in kit.step_records(run)), default=0.0)
        step_sum = sum(r.get(counter, 0.0) for r in kit.step_records(run))
        return f"exit 0; `{counter}` max {total:g} (summed over steps {step_sum:g})", total > 0
    if expect == "recovered":
        diff = kit.loss_difference(reference, kit.losses(run))
        return f"exit 0, losses differ by {diff:.1e}", diff == 0.0
    return f"exit 0, expected {expect}", False


def actor_kill(ws: Path, reference: dict, which: str) -> list[Row]:
    """Kill -9 the run's Ray actor 30 ms after step 3's record; then rerun the same command."""
    extra = {} if which == "rollout" else {
        "rollout": {"num_workers": 0},
        "teachers": [{**t, "num_workers": 1 if t["name"] == "text" else 0, "threads_per_worker": 1}
                     for t in kit.job_config(ws, "x")["teachers"]]}
    name = f"actor_{which}"
    cfg = kit.job_config(ws, name, extra, steps=STEPS, every=EVERY)
    config, run = kit.write_job(ws, name, cfg), kit.run_dir(cfg)
    out = kit.train_and_kill(config, kit.KillWhen(record_step=3, delay_s=0.03, watch=run), target="actors",
                             timeout_s=240)
    happened, ok = classify(out, "error")
    what = f"{which} actor killed ({len(out.pids_killed)} pid) 30 ms after step 3's record"
    rows = [Row(what, happened, "-", "-", out.seconds, ok and len(out.pids_killed) == 1)]
    again = kit.train(config, timeout_s=300)
    happened, ok = classify(again, "recovered", run, reference)
    lost = STEPS - len(kit.losses(run))
    rows.append(Row(f"{which} actor killed: same command again", f"{happened}; resumed from "
                    f"{resumed_from(again.output)}", str(lost), "yes (0.0)" if ok else "no", again.seconds,
                    ok and kit.one_record_per_step(run, STEPS) and not kit.checkpoint_problems(run)))
    return rows


def damaged_checkpoint(ws: Path, reference: dict, run: Path, config: Path) -> list[Row]:
    """Damage the newest checkpoint of a finished run on disk, rerun: the previous one is used (and said)."""
    rows = []
    newest = run / "checkpoints" / f"step_{STEPS:06d}"
    for damage in ("truncated model.safetensors", "one byte flipped in a DCP shard"):
        if damage.startswith("truncated"):
            f = newest / "model.safetensors"
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        else:
            f = sorted((newest / "dcp").glob("*.distcp"))[0]
            data = bytearray(f.read_bytes())
            data[len(data) // 3] ^= 0x01
            f.write_bytes(bytes(data))
        out = kit.train(config, timeout_s=300)
        said = [line for line in out.output.splitlines() if "is unusable" in line]
        happened, ok = classify(out, "recovered", run, reference)
        happened += f"; log: `{said[0][-90:]}`" if said else "; NOT SAID in the log"
        happened += f"; resumed from {resumed_from(out.output)}"
        ok = ok and bool(said) and resumed_from(out.output) == f"step_{STEPS - EVERY:06d}" \
            and not kit.checkpoint_problems(run) and kit.one_record_per_step(run, STEPS)
        rows.append(Row(f"checkpoint: {damage}", happened, str(STEPS - len(kit.losses(run))),
                        "yes (0.0)" if ok else "no", out.seconds, ok))
    return rows




def quick_job(ws: Path, name: str, extra: dict) -> tuple[Path, Path]:
    """A 2-step job without Ray (rollouts in-process): for faults of inputs, not of processes."""
    base = {"rollout": {"num_workers": 0}, "rewards": {"num_workers": 1, "timeout_s": 2.0}}
    for key, value in extra.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    cfg = kit.job_config(ws, name, base, steps=2, every=2)
    return kit.write_job(ws, name, cfg), kit.run_dir(cfg)


def reward_faults(ws: Path) -> list[Row]:
    plugin = ws / "bad_rewards.py"
    plugin.write_text(kit.BAD_REWARDS)
    rows = []
    cases = [("raises", "error", {}), ("hangs", "error", {}), ("nan", "error", {}), ("word", "error", {}),
             ("flaky", "counted", {"on_error": "zero", "max_error_frac": 0.5, "num_workers": 0})]
    for fn, expect, options in cases:
        routes = {d: f"{plugin}:{fn}" for d in ("video", "retrieval", "tool", "reasoning")}
        config, run = quick_job(ws, f"reward_{fn}", {"rewards": {"routes": routes, **options}})
        out = kit.train(config, timeout_s=180)
        happened, ok = classify(out, expect, run, counter="reward/error_frac")
        label = {"raises": "raises", "hangs": "hangs past rewards.timeout_s=2", "nan": "returns NaN",
                 "word": "returns a string", "flaky": "raises on every 5th call, on_error: zero"}[fn]
        rows.append(Row(f"reward `{plugin.name}:{fn}` {label}", happened, "-", "-", out.seconds, ok))
    return rows


def write_clip(path: Path, seconds: int = 4, fps: int = 4) -> None:
    """A small h264 mp4: dark, red during [1, 3)."""
    from fractions import Fraction

    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for i in range(seconds * fps):
            image = np.full((32, 32, 3), 20, dtype=np.uint8)
            if 1 <= Fraction(i, fps) < 3:
                image[:] = (230, 40, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def data_faults(ws: Path) -> list[Row]:
    folder = ws / "videos"
    folder.mkdir(exist_ok=True)
    for i in range(3):
        write_clip(folder / f"clip{i}.mp4")
    good = (folder / "clip0.mp4").read_bytes()
    (folder / "corrupt.mp4").write_bytes(good[:48] + bytes(reversed(good[48:])))
    line = lambda video, i: json.dumps({"id": f"{video}-{i}", "video": video, "query": "red", "window": [1, 3]})  # noqa: E731
    ok_lines = [line(f"clip{i}.mp4", i) for i in range(3)]
    files = {
        "broken line": [*ok_lines[:2], '{"video": "clip2.mp4", "query": "red", "window": [1, 3', ok_lines[2]],
        "a missing video": [*ok_lines, line("missing.mp4", 9)],
        "a corrupt video": [*ok_lines, line("corrupt.mp4", 9)],
        "every video missing": [line(f"gone{i}.mp4", i) for i in range(3)],
    }
    expect = {"broken line": "error", "a missing video": "counted", "a corrupt video": "counted",
              "every video missing": "error"}
    rows = []
    for label, lines in files.items():
        slug = label.replace(" ", "_")
        path = folder / f"{slug}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        config, run = quick_job(ws, f"data_{slug}", {"data": {"train": [
            {"source": "video_files", "args": {"path": str(path)}}], "prompts_per_step": 4}})
        out = kit.train(config, timeout_s=180)
        happened, ok = classify(out, expect[label], run, counter="data/skipped_videos")
        rows.append(Row(f"data: `video_files` JSONL with {label}", happened, "-", "-", out.seconds, ok))
    return rows


# ---------------------------------------------------------------------- the table


def table(rows: list[Row]) -> str:
    head = ["fault", "what happened", "steps lost", "resumed losses equal (max abs diff)", "s", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r.cells()) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="kill -9 moments")
    parser.add_argument("--chain", type=int, default=4, help="kills per run folder (each followed by a rerun)")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--quick", action="store_true", help="4 kill moments in chains of 2")
    parser.add_argument("--only", nargs="*", default=["kills", "actors", "checkpoint", "rewards", "data"])
    parser.add_argument("--workspace", type=Path, default=Path("runs/fault_suite/workspace"))
    parser.add_argument("--out", type=Path, default=Path("runs/fault_suite/summary.md"))
    args = parser.parse_args(argv)
    if args.quick:
        args.kills, args.chain = 4, 2
    t0 = time.monotonic()
    ws = kit.build_workspace(args.workspace.resolve())
    for old in (ws / "runs").glob("*") if (ws / "runs").exists() else []:
        import shutil

        shutil.rmtree(old)
    cfg = kit.job_config(ws, "reference", steps=STEPS, every=EVERY)
    ref_config, ref_run = kit.write_job(ws, "reference", cfg), kit.run_dir(cfg)
    ref = kit.train(ref_config)
    reference = kit.losses(ref_run)
    if ref.rc != 0 or len(reference) != STEPS:
        print(ref.output[-3000:])
        raise SystemExit("the reference run failed")
    rows = [Row("none (reference run)", f"exit 0, {STEPS} steps, checkpoint every {EVERY}", "0", "-", ref.seconds, True)]
    stats = None
    if "kills" in args.only:
        kill_rows, stats = kill_sweep(ws, reference, args.kills, args.chain, args.seed)
        rows += kill_rows
    if "actors" in args.only:
        rows += actor_kill(ws, reference, "rollout") + actor_kill(ws, reference, "teacher")
    if "checkpoint" in args.only:
        rows += damaged_checkpoint(ws, reference, ref_run, ref_config)
    if "rewards" in args.only:
        rows += reward_faults(ws)
    if "data" in args.only:
        rows += data_faults(ws)
    wall = time.monotonic() - t0
    text = table(rows)
    if stats:
        text += (f"\n\nkill -9: {stats['exact']}/{stats['kills']} resumes continue exactly (max abs difference of "
                 f"per-step losses {stats['max_diff']:.1e}); {stats['mid_checkpoint']} of them inside a checkpoint "
                 f"save; {stats['damaged']} left a damaged `step_*` folder or `final`.")
    failed = [r for r in rows if not r.ok]
    text += f"\n\n{len(rows) - len(failed)}/{len(rows)} rows as required; wall time {wall:.0f} s " \
            f"(`python bench/fault_suite.py {' '.join(argv if argv is not None else sys.argv[1:])}`)\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
