"""TRL's own reward functions, from the installed trl, unchanged: the reward-input builder speaks TRL's calling
convention (conversational prompts/completions, completion_ids, every task field as a keyword, trainer_state)."""

from __future__ import annotations

import json

import pytest

from conftest import job, make_text_sample, make_video, make_video_sample, run
from rewards import RewardScorer, get_reward
from rewards.inputs import RewardTrainerState, reward_requests


def _samples():
    a = make_text_sample("What is 2 + 3?", sid="a")
    a.metadata = {"solution": "$5$", "level": 1}
    b = make_video_sample(make_video(n_frames=2), question="When?", sid="b")
    b.metadata = {"solution": "$7$"}
    return [a, b]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_think_format_reward_from_trl_runs_unchanged(num_workers):
    """TRL's think_format_reward reads `completion[0]["content"]`: it needs conversational completions."""
    scorer = RewardScorer({"*": "trl.rewards:think_format_reward"}, num_workers=num_workers)
    samples = _samples()
    for s in samples:
        s.domain = "*"
    completions = ["<think>\nadd them\n</think>\n5", "7"]
    result = scorer.score(reward_requests(samples, completions))
    scorer.close()
    assert result.rewards.tolist() == [1.0, 0.0] and not result.failed.any()


def test_soft_overlong_punishment_gets_completion_ids():
    from trl.rewards import get_soft_overlong_punishment

    reward = get_soft_overlong_punishment(max_completion_len=4, soft_punish_cache=2)
    scorer = RewardScorer({"reasoning": reward, "video": reward}, num_workers=0)
    ids = [[1], [1, 2, 3], [1, 2, 3, 4, 5, 6]]
    samples = [make_text_sample(sid=str(i)) for i in range(3)]
    result = scorer.score(reward_requests(samples, ["x", "y", "z"], ids))
    # TRL's rule by hand: 0 up to max - cache = 2 tokens, then (2 - len) / 2, and -1 beyond 4
    assert result.rewards.tolist() == [0.0, -0.5, -1.0]


def test_accuracy_reward_reads_the_solution_column():
    """`accuracy_reward(completions, solution, **kwargs)`: the task's `solution` metadata arrives as a column.
    Without math_verify installed the call still passes the signature and stops at TRL's own install check."""
    from trl.import_utils import is_math_verify_available
    from trl.rewards import accuracy_reward

    reward = get_reward(accuracy_reward)
    samples = _samples()
    requests = reward_requests(samples, [r"\boxed{5}", r"\boxed{8}"])
    prompts = [r["prompt"] for r in requests]
    extras = [{"messages": r["messages"], "fields": r["fields"]} for r in requests]
    metas = [r["metadata"] for r in requests]
    outcomes = reward.outcomes(prompts, [r["completion"] for r in requests], [s.reference for s in samples], metas,
                               extras)
    if is_math_verify_available():
        assert [o.value for o in outcomes] == [1.0, 0.0]
    else:
        assert all("ImportError: Please install the `math_verify` package" in o.error for o in outcomes)


def test_every_column_and_trainer_state_reach_a_trl_style_reward():
    seen = {}

    def spy(prompts, completions, completion_ids, trainer_state, **columns):
        seen.update(prompts=prompts, completions=completions, ids=completion_ids, state=trainer_state, **columns)
        return [0.0] * len(completions)

    scorer = RewardScorer({"reasoning": spy, "video": spy}, num_workers=0)
    samples = _samples()
    scorer.score(reward_requests(samples, ["five", "seven"], [[5], [7]]), trainer_state=RewardTrainerState(3, 10))
    assert seen["completions"] == [[{"role": "assistant", "content": "five"}], [{"role": "assistant", "content": "seven"}]]
    assert seen["prompts"][0] == [{"role": "user", "content": "What is 2 + 3?"}]
    assert seen["prompts"][1][0]["content"][0] == {"type": "video"}  # no frames travel to a reward
    assert seen["ids"] == [[5], [7]] and seen["state"].global_step == 3 and seen["state"].max_steps == 10
    assert seen["id"] == ["a", "b"] and seen["domain"] == ["reasoning", "video"]
    assert seen["reference"] == seen["ground_truth"] == ["5", [0.0, 1.0]]
    assert seen["solution"] == ["$5$", "$7$"] and seen["level"] == [1, None]  # metadata wins over the alias
    assert {"target", "tools", "reward"} <= set(seen)


def test_trl_rewards_drive_a_tiny_training_run(workspace, tmp_path):
    """TRL's overlong punishment with max_completion_len = cache = 6 is -len/6 for len <= 6 (max_new_tokens):
    the logged mean reward must equal -response_len / 6 at every step, so completion_ids reached it in training."""
    plugin = tmp_path / "trl_rewards.py"
    plugin.write_text("from trl.rewards import get_soft_overlong_punishment\n"
                      "overlong = get_soft_overlong_punishment(max_completion_len=6, soft_punish_cache=6)\n")
    spec = [{"reward": f"{plugin}:overlong", "weight": 1.0}, {"reward": "trl.rewards:think_format_reward",
                                                              "weight": 1.0}]
    routes = {d: spec for d in ("video", "retrieval", "tool", "reasoning")}
    trainer = run(job(workspace, "trl_rewards", {
        "teachers": [], "algorithm": {"advantage": "grpo", "policy_loss": "grpo"},
        "rewards": {"routes": routes, "num_workers": 1},
        "trainer": {"steps": 2, "eval_teachers": False, "eval_at_start": False},
    }))
    records = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for record in records:
        assert record["reward/error_frac"] == 0.0
        assert record["reward/mean"] == pytest.approx(-record["rollout/response_len"] / 6, abs=1e-6)
