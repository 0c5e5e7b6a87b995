"""The console script. Each subcommand is a thin layer over a library function."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

import mopd  # noqa: F401  (registers the mopd advantage estimator)

EXIT_ERROR = 1  # every failure of a subcommand (argparse keeps 2 for a malformed command line)
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT
TRACEBACK_ENV = "VLPOST_TRACEBACK"


def _train(args: argparse.Namespace) -> int:
    from rl.config import load_config
    from rl.config_check import check_config
    from rl.placement import resolve_launcher
    from rl.trainer import train_job

    cfg, resolved = load_config(args.config, args.overrides)
    if resolve_launcher(cfg) == "torchrun" and int(os.environ["RANK"]) > 0:
        # a torchrun rank > 0 is a policy rank only: it serves what rank 0 (the controller) asks
        from rl.worker_group import init_torchrun_group, serve_policy_rank

        if not check_config(cfg, require_files=True)[0]:  # rank 0 reports the problems and stops the job
            serve_policy_rank(cfg, *init_torchrun_group(cfg))
            # Done, group closed, nothing left to write. Skip interpreter finalization: a gloo worker thread that
            # outlives the group can abort the process there ("terminate called without an active exception",
            # SIGABRT after a finished run: seen in a few percent of 2-rank CPU runs here; pytorch/pytorch#179291).
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        return 0
    problems, _ = check_config(cfg, require_files=True)
    if problems:  # what `check` would report stops the run before any model, actor or data is loaded
        for p in problems:
            print(f"error: {args.config}: {p}", file=sys.stderr)
        return EXIT_ERROR
    train_job(cfg, resolved, args.config)
    summary = json.loads((cfg.run_dir / "eval" / "summary.json").read_text())
    print(format_summary(summary))
    return 0


def _check(args: argparse.Namespace) -> int:
    from cli.demo import check_plan, is_plan
    from rl.config import load_config
    from rl.config_check import check_config

    from compare.plan import is_compare_plan, load_plan

    if is_plan(args.config):  # a demo plan: every stage, as `demo` will run it
        problems, notes = check_plan(args.config, args.overrides, require_files=args.require_files)
    elif is_compare_plan(args.config):  # a comparison plan: its keys (its jobs are checked when `compare` starts)
        plan = load_plan(args.config, args.overrides)
        problems, notes = [], [f"comparison plan: {len(plan.domains)} domains, "
                                f"{sum(m.enabled for m in plan.methods.values())} methods, seeds {plan.seeds}"]
    else:
        cfg, _ = load_config(args.config, args.overrides)
        problems, notes = check_config(cfg, require_files=args.require_files)
    for note in notes:
        print(f"  {note}")
    if problems:
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        return EXIT_ERROR
    print(f"{args.config}: OK")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from rl.eval_cli import run_eval

    return run_eval(args)


def _rewards(args: argparse.Namespace) -> int:
    from rewards.registry import format_reward_table

    print(format_reward_table())
    return 0


def _score(argv: list[str]) -> int:
    from evals.score import main as score_main

    return EXIT_ERROR if score_main(argv) else 0  # it printed its own one-line error


def _keys(args: argparse.Namespace) -> int:
    from rl.config import JobConfig
    from rl.config_loader import describe_fields

    print("| key | default | meaning |\n| --- | --- | --- |")
    for key, default, help_text in describe_fields(JobConfig):
        print(f"| `{key}` | `{default}` | {help_text} |")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from cli.demo import run_demo

    return run_demo(args.config, args.overrides)


def _compare(args: argparse.Namespace) -> int:
    from compare.runner import run_compare

    run_compare(args.config, args.overrides)
    return 0


def format_summary(summary: dict) -> str:
    rows = [f"{'domain':<12} {'before':>8} {'after':>8} {'teacher':>8} {'after/teacher':>14} {'n':>5}"]
    for domain, r in summary["domains"].items():
        teacher = r.get("teacher")
        ratio = r.get("retention")
        rows.append(
            f"{domain:<12} {r['student_before']:>8.3f} {r['student_after']:>8.3f} "
            f"{'-' if teacher is None else f'{teacher:.3f}':>8} "
            f"{'' if ratio is None else f'{ratio:.0%}':>14} {r['n']:>5}"
        )
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlpost", description="Post-training of long-video multimodal MoE models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run a training job (MOPD, GSPO, GRPO, SFT warm-up) from a YAML config")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.steps=20 rollout.group_size=4")
    p.set_defaults(fn=_train)

    p = sub.add_parser("check", help="validate a config without running it")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--require-files", action="store_true", help="also fail when model/teacher folders are missing")
    p.set_defaults(fn=_check)

    p = sub.add_parser("eval", help="score a checkpoint, or every checkpoint of a run, on held-out tasks")
    p.add_argument("path", help="a checkpoint folder or a run folder")
    p.add_argument("--config", help="job config for tasks and rewards (default: the run's config.yaml)")
    p.add_argument("--tasks", help="comma-separated domains to keep (default: all held-out tasks)")
    p.add_argument("--benchmark", help="a benchmark adapter instead of the config's eval tasks (niah, bfcl, ...)")
    p.add_argument("--annotations", help="the benchmark's files")
    p.add_argument("--video-dir", help="video folder of a video benchmark")
    p.add_argument("--limit", type=int, help="evaluate at most this many samples")
    p.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                   help="argument of the benchmark's task source, YAML value (e.g. --arg lengths=[1024,4096])")
    p.add_argument("--watch", action="store_true", help="keep scoring new checkpoints of the run as they appear")
    p.add_argument("--poll", type=float, default=10.0, help="seconds between looks for new checkpoints (--watch)")
    p.add_argument("--out", help="where to write the JSON (default: inside the run or checkpoint)")
    p.set_defaults(fn=_eval)

    p = sub.add_parser("rewards", help="reward functions: `rewards list`")
    p.add_argument("action", choices=["list"])
    p.set_defaults(fn=_rewards)

    p = sub.add_parser("demo", help="the embedded-default demo: teachers, base student, MOPD, report")
    p.add_argument("--config", default=None, help="demo plan (default: configs/demo.yaml)")
    p.add_argument("overrides", nargs="*", help="overrides applied to the MOPD stage")
    p.set_defaults(fn=_demo)

    p = sub.add_parser("compare", help="MOPD against Mix-RL, Cascade RL, off-policy FT and parameter merges from "
                                       "one base student (docs/compare.md); finished stages are skipped")
    p.add_argument("config", help="comparison plan, e.g. configs/compare_tiny.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the plan, e.g. seeds=[0] budget.updates=30")
    p.set_defaults(fn=_compare)

    p = sub.add_parser("keys", help="print every config key with its default and meaning (Markdown)")
    p.set_defaults(fn=_keys)

    sub.add_parser("score", help="score a predictions file by a benchmark's official protocol (see score -h)",
                   add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The one exit path: a subcommand's error is one line `error: ...` and exit code 1 (Ctrl-C: 130).
    `--traceback` (anywhere on the command line) or VLPOST_TRACEBACK=1 prints the traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    show_traceback = "--traceback" in argv or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != "--traceback"]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from models.factory import quiet_libraries

    quiet_libraries()
    try:
        if argv and argv[0] == "score":
            return _score(argv[1:])
        args = build_parser().parse_args(argv)
        return args.fn(args)
    except KeyboardInterrupt:
        if show_traceback:
            traceback.print_exc()
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - the one place errors become exit codes
        if show_traceback:
            traceback.print_exc()
        print(f"error: {describe_error(err)}", file=sys.stderr)
        return EXIT_ERROR


# Errors that carry a message meant for the user (what went wrong and where); anything else is reported with its
# type and a pointer to the traceback, because it is more likely a bug than a mistake in the job.
NAMED_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, KeyError, RuntimeError, ImportError,
                                                 TimeoutError)


def describe_error(err: BaseException) -> str:
    """One line for `err`: its message for named errors, `Type: message (...)` otherwise."""
    message = err.args[0] if isinstance(err, KeyError) and err.args and isinstance(err.args[0], str) else str(err)
    message = " ".join(message.split()) or type(err).__name__
    if isinstance(err, NAMED_ERRORS):
        return message
    return f"{type(err).__name__}: {message} (unexpected: rerun with --traceback or {TRACEBACK_ENV}=1 to see where)"


if __name__ == "__main__":
    raise SystemExit(main())
