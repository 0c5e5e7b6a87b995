"""`vlpost compare`: the normalized score against hand computations, the summary schema, a toy comparison that
runs every method once, caching (a second run trains and evaluates nothing), and merges across architectures
reported as n/a."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cli.main import main
from compare.plan import load_plan
from compare.runner import run_compare
from compare.score import (build_summary, domain_gap_closed, format_table, leader_verdict, mean_std,
                           normalized_score)
from rl.config_loader import ConfigError

# ---------------------------------------------------------------------- arithmetic


def test_normalized_score_by_hand():
    # domain a, two benchmarks: (0.6 - 0.2) + (0.5 - 0.5) over (1.0 - 0.2) + (0.9 - 0.5) = 0.4 / 1.2 = 1/3
    # domain b, one benchmark: (0.7 - 0.4) / (0.6 - 0.4) = 1.5 (past the teacher)
    scores = {"a": {"x": 0.6, "y": 0.5}, "b": {"z": 0.7}}
    student = {"a": {"x": 0.2, "y": 0.5}, "b": {"z": 0.4}}
    teacher = {"a": {"x": 1.0, "y": 0.9}, "b": {"z": 0.6}}
    per_domain, mean = normalized_score(scores, student, teacher)
    assert per_domain["a"] == pytest.approx(1 / 3) and per_domain["b"] == pytest.approx(1.5)
    assert mean == pytest.approx((1 / 3 + 1.5) / 2)
    # the teacher scores 1, the student 0, by construction
    assert normalized_score(teacher, student, teacher)[1] == pytest.approx(1.0)
    assert normalized_score(student, student, teacher)[1] == pytest.approx(0.0)
    # no gap to close: undefined, left out of the mean
    assert domain_gap_closed({"x": 0.5}, {"x": 0.5}, {"x": 0.5}) is None
    per_domain, mean = normalized_score({"a": {"x": 0.5}, "b": {"z": 0.5}}, {"a": {"x": 0.5}, "b": {"z": 0.0}},
                                        {"a": {"x": 0.4}, "b": {"z": 1.0}})
    assert per_domain["a"] is None and mean == pytest.approx(0.5)


def test_summary_schema_and_seed_statistics():
    student, teacher = {"a": 0.2, "b": 0.0}, {"a": 1.0, "b": 0.5}
    seeds = [{"a": 0.6, "b": 0.25}, {"a": 1.0, "b": 0.5}]  # normalized 0.5 and 1.0
    summary = build_summary({"m": seeds, "merge": None}, student, teacher, {"updates": 10})
    assert set(summary) == {"methods", "budget"}
    m = summary["methods"]["m"]
    assert set(m) == {"normalized", "normalized_std", "domains"}
    assert m["normalized"] == pytest.approx(0.75)
    assert m["normalized_std"] == pytest.approx(mean_std([0.5, 1.0])[1]) == pytest.approx(0.3535534)
    assert m["domains"]["a"] == {"mean": pytest.approx(0.8), "std": pytest.approx(0.2828427)}
    assert summary["methods"]["merge"] == {"normalized": None, "normalized_std": None, "domains": {}}
    table = format_table(summary)
    assert "| m | 0.750 ± 0.354 |" in table and "| merge | n/a | n/a | n/a |" in table


def test_leader_verdict_compares_the_margin_with_the_seeds_spread():
    """The first method leads 'by more than the spread' only if its margin over every other method exceeds the
    larger of the two standard deviations; the line names the closest competitor."""
    def summary(rows):
        return {"methods": {n: {"normalized": m, "normalized_std": s, "domains": {}} for n, m, s in rows}}

    clear = summary([("a", 0.99, 0.005), ("b", 0.95, 0.02), ("c", 0.5, 0.1), ("merge", None, None)])
    line = leader_verdict(clear, ["a", "b", "c", "merge"], {"a": "MOPD"})
    assert line.startswith("first: MOPD 0.990 ± 0.005;") and "spread: yes" in line
    assert "closest: b 0.950 ± 0.020, margin 0.040 against spread 0.020" in line
    close = summary([("a", 0.99, 0.005), ("b", 0.98, 0.02)])
    assert "spread: no (closest: b" in leader_verdict(close, ["a", "b"])
    # the hardest competitor is the one whose margin is smallest against its spread, not the runner-up
    tricky = summary([("a", 0.99, 0.0), ("b", 0.97, 0.001), ("c", 0.9, 0.2)])
    assert "spread: no (closest: c" in leader_verdict(tricky, ["a", "b", "c"])
    one_seed = summary([("a", 0.99, 0.0), ("b", 0.98, 0.0)])
    assert "spread: yes (one seed: no spread measured)" in leader_verdict(one_seed, ["a", "b"])
    # with kinds, a variant of the leader's own method is not a competitor
    variants = summary([("mopd_a", 0.99, 0.005), ("mopd_b", 0.985, 0.01), ("ft", 0.9, 0.02)])
    kinds = {"mopd_a": "mopd", "mopd_b": "mopd", "ft": "offpolicy_ft"}
    line = leader_verdict(variants, list(kinds), kinds=kinds)
    assert "ahead of every method of another kind by more than the seeds' spread: yes (closest: ft" in line
    assert "spread: no (closest: mopd_b" in leader_verdict(variants, list(kinds))


# ---------------------------------------------------------------------- the toy comparison


def _toy_plan(workspace: Path, root: Path, teacher_path: dict[str, str] | None = None,
              methods: dict | None = None) -> Path:
    data = {"data_dir": str(workspace / "data"), "n_train": 16, "n_eval": 4}
    sft = {"rollout": {"backend": "reference", "group_size": 1},
           "algorithm": {"advantage": "sft", "policy_loss": "nll", "loss_agg": "token_mean", "mismatch": "none"},
           "data": {"prompts_per_step": 4}, "optim": {"lr": 1e-2}, "trainer": {"steps": 2}}
    gspo = {"rollout": {"group_size": 2}, "algorithm": {"advantage": "gspo", "policy_loss": "gspo"}}
    domains = {}
    for d in ("tool", "reasoning"):
        teacher = {"path": teacher_path[d]} if teacher_path and d in teacher_path else {"job": sft}
        domains[d] = {"train": [{"source": "embedded", "args": {**data, "split": "train", "domains": [d]}}],
                      "eval": [{"source": "embedded", "args": {**data, "split": "eval", "domains": [d]}}],
                      "teacher": teacher}
    plan = {
        "run": {"name": "toy", "dir": str(root)},
        "seeds": [0],
        "common": {"rollout": {"num_workers": 0}, "rewards": {"num_workers": 0}, "eval": {"max_new_tokens": 6},
                   "logging": {"progress": False, "tensorboard": False}, "optim": {"lr": 1e-3},
                   "trainer": {"micro_batch_size": 8}},
        "student": {"path": str(workspace / "student")},
        "domains": domains,
        "budget": {"updates": 2, "sequences_per_update": 4, "max_new_tokens": 6},
        "eval_every_updates": 1,
        "methods": methods if methods is not None else {
            "mopd": {"kind": "mopd", "teacher_args": {"num_workers": 0},
                     "job": {"rollout": {"group_size": 1}, "algorithm": {"advantage": "mopd", "mopd_adv_clip": 5.0}}},
            "mix_rl": {"kind": "mix_rl", "job": gspo, "lr_sweep": [1e-3, 1e-2], "select_samples": 2},
            "cascade_rl": {"kind": "cascade_rl", "order": ["reasoning", "tool"], "job": gspo},
            "offpolicy_ft": {"kind": "offpolicy_ft", "prompts_per_domain": 4, "min_reward": 0.0,
                             "keep_truncated": True, "job": sft},
            "merge_average": {"kind": "merge_average"},
            "merge_task_arithmetic": {"kind": "merge_task_arithmetic", "lambdas": [0.5, 1.0], "select_samples": 2},
        },
    }
    path = root / "toy.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


def test_toy_comparison_runs_every_method_and_caches(workspace, tmp_path):
    plan = _toy_plan(workspace, tmp_path / "runs")
    lines: list[str] = []
    summary = run_compare(str(plan), [], log=lines.append)
    out = tmp_path / "runs" / "toy" / "compare"
    assert json.loads((out / "summary.json").read_text()) == summary
    assert set(summary) == {"methods", "budget"}
    expected = ["base_student", "teacher_reference", "mopd", "mix_rl", "cascade_rl", "offpolicy_ft",
                "merge_average", "merge_task_arithmetic"]
    assert list(summary["methods"]) == expected
    for name, entry in summary["methods"].items():
        assert set(entry) == {"normalized", "normalized_std", "domains"}, name
        assert set(entry["domains"]) == {"tool", "reasoning"}, name
        for row in entry["domains"].values():
            assert set(row) == {"mean", "std"} and 0.0 <= row["mean"] <= 1.0
    spent = summary["budget"]["methods"]
    for name in ("mopd", "mix_rl", "cascade_rl", "offpolicy_ft"):  # the same update budget for every method
        assert spent[name]["updates"] == 2 and spent[name]["sequences_per_update"] == 4, name
    assert spent["offpolicy_ft"]["teacher_generated_tokens"] > 0
    root = tmp_path / "runs" / "toy"
    assert (root / "s0" / "cascade_rl" / "1_reasoning" / "final").exists()
    assert (root / "s0" / "cascade_rl" / "2_tool" / "final").exists()
    assert (root / "merges" / "merge_task_arithmetic" / "lambda_0.5" / "model.safetensors").exists()
    assert set(json.loads((out / "merge_task_arithmetic_selection.json").read_text())["train_normalized"]) == {
        "0.5", "1"}
    for d in ("tool", "reasoning"):
        assert (out / "plots" / f"{d}.png").stat().st_size > 0
    written = sorted(p.name for p in (out / "configs").iterdir())
    assert "s0_mopd.yaml" in written and not any(n.startswith("check_") for n in written)
    assert (out / "table.md").read_text().startswith("| method | normalized |")
    verdict = (out / "table.md").read_text().strip().splitlines()[-1]  # the leader among the methods, not teachers
    assert verdict.startswith("first: ") and verdict in lines and "each teacher" not in verdict
    # teachers, mix_rl's two learning rates (the chosen one is its seed-0 run), mopd, cascade, off-policy
    assert sum("training ->" in line for line in lines) == 2 + 2 + 1 + 2 + 1
    chosen = json.loads((out / "mix_rl_lr_selection.json").read_text())
    assert chosen["lr"] in (1e-3, 1e-2) and set(chosen["train_normalized"]) == {"0.001", "0.01"}
    assert (root / "s0" / "mix_rl_lr0.001" / "final").exists() and (root / "s0" / "mix_rl_lr0.01" / "final").exists()
    assert f"mix_rl (lr {chosen['lr']:g})" in (out / "table.md").read_text()

    again: list[str] = []
    assert run_compare(str(plan), [], log=again.append) == summary
    assert not any("training ->" in line for line in again)  # every stage cached
    assert not any(line.startswith("[compare] eval ") for line in again)  # every evaluation cached
    assert sum("done already" in line for line in again) == 2 + 2 + 1 + 1 + 2 + 1

    assert main(["compare", str(plan)]) == 0  # the command line: everything cached
    assert main(["check", str(plan)]) == 0

    # sweeps off: the method trains once, at its own rate, under its plain name; nothing else retrains
    unswept: list[str] = []
    no_sweep = run_compare(str(plan), ["sweep_learning_rates=false"], log=unswept.append)
    assert [line for line in unswept if "training ->" in line] == [
        f"[compare] s0/mix_rl: training -> {root / 's0' / 'mix_rl'}"]
    assert "mix_rl (lr" not in (out / "table.md").read_text()
    assert no_sweep["methods"]["mopd"] == summary["methods"]["mopd"]

    # a cached stage under a changed job is refused with the key named, not silently reused
    with pytest.raises(ConfigError, match="optim.lr"):
        run_compare(str(plan), ["methods.mix_rl.job.optim.lr=0.5"], log=lambda _line: None)


def test_merges_across_architectures_are_na(workspace, tmp_path):
    plan = _toy_plan(workspace, tmp_path / "runs", teacher_path={"tool": str(workspace / "teacher_text")},
                     methods={"merge_average": {"kind": "merge_average"},
                              "merge_task_arithmetic": {"kind": "merge_task_arithmetic", "lambdas": [1.0]}})
    lines: list[str] = []
    summary = run_compare(str(plan), [], log=lines.append)
    for name in ("merge_average", "merge_task_arithmetic"):
        assert summary["methods"][name] == {"normalized": None, "normalized_std": None, "domains": {}}
    assert any("n/a" in line and "lacks" in line for line in lines)


def test_plan_errors_name_the_key(tmp_path, workspace):
    plan = _toy_plan(workspace, tmp_path / "runs")
    with pytest.raises(ConfigError, match="methods.mopd.kind"):
        load_plan(plan, ["methods.mopd.kind=mopdd"])
    with pytest.raises(ConfigError, match="exactly one of job, config, path"):
        load_plan(plan, ["domains.tool.teacher.config=x.yaml"])
    lines: list[str] = []
    with pytest.raises(ValueError, match="not a whole number of prompts"):
        run_compare(str(plan), ["budget.sequences_per_update=3", "methods={mix_rl: {kind: mix_rl, job: "
                                "{rollout: {group_size: 2}, algorithm: {advantage: gspo, policy_loss: gspo}}}}"],
                    log=lines.append)
    assert not lines  # refused before any stage ran


def test_demonstrations_source_keeps_answered_samples(workspace, tmp_path):
    from tasks.demonstrations import DemonstrationTasks

    args = {"data_dir": str(workspace / "data"), "n_train": 16, "n_eval": 4, "split": "train", "domains": ["tool"]}
    file = tmp_path / "demos.jsonl"
    file.write_text('{"id": "tool-train-3", "target": "forty two", "reward": 1.0}\n'
                    '{"id": "tool-train-5", "target": "seven"}\n')
    samples = list(DemonstrationTasks(str(file), "embedded", args, seed=0))
    assert [(s.id, s.target) for s in samples] == [("tool-train-3", "forty two"), ("tool-train-5", "seven")]
    assert samples[0].tools and samples[0].domain == "tool"


def test_shipped_plans_load():
    plan = load_plan("configs/compare_tiny.yaml")
    assert [m.kind for m in plan.methods.values()] == ["mopd", "mopd", "mopd", "mopd", "mix_rl", "cascade_rl",
                                                       "offpolicy_ft", "offpolicy_ft", "merge_average",
                                                       "merge_task_arithmetic"]
    assert plan.methods["offpolicy_ft_seq"].job["algorithm"] == {"loss_agg": "seq_mean_token_mean"}
    assert Path(plan.methods["mopd"].job["base"][0]).is_file()
    cross = load_plan("configs/compare_crossmodal_tiny.yaml")
    assert cross.student.source() == "config" and cross.domains["tool"].teacher.source() == "config"


def test_a_swept_rate_equal_to_the_methods_own_is_its_plain_run():
    """A sweep that includes the plan's own rate reuses the method's plain run (and the seeds' runs, named the
    same); another rate gets its own run at that rate."""
    from compare.methods import with_lr
    from compare.plan import MethodSpec

    spec = MethodSpec(kind="mix_rl", job={"optim": {"lr": 1e-3, "warmup_steps": 5}})
    assert with_lr("mix_rl", spec, 1e-3) == ("mix_rl", spec)
    assert with_lr("mix_rl", spec, None) == ("mix_rl", spec)
    name, other = with_lr("mix_rl", spec, 1e-2)
    assert name == "mix_rl_lr0.01" and other.job["optim"] == {"lr": 1e-2, "warmup_steps": 5}
    assert spec.job["optim"]["lr"] == 1e-3  # the plan's spec is not changed
