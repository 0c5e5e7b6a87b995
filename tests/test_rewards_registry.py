"""Reward registry: spec loading (names, modules, files), the three signatures, the combinator, the table."""

from __future__ import annotations

import math
import textwrap

import pytest

import rewards
from rewards import InvalidAnswer, RewardError, RewardSpecError, combine, get_reward, list_rewards, register_reward
from rewards.registry import detect_style

PLUGIN = textwrap.dedent(
    '''
    from rewards import InvalidAnswer

    def native(completion, reference, **meta):
        if not completion:
            raise InvalidAnswer("empty")
        return float(completion == reference) + meta.get("bonus", 0.0)

    def native_narrow(completion, reference, bonus=0.0):
        return float(completion == reference) + bonus

    def native_with_prompt(completion, reference, prompt, **meta):
        return float(prompt in completion)

    def trl(prompts, completions, ground_truth, **kwargs):
        assert kwargs["reference"] == ground_truth
        return [float(c == g) + (k or 0) for c, g, k in zip(completions, ground_truth, kwargs["bonus"])]

    def trl_completions_only(completions, **kwargs):
        return [len(c) for c in completions]

    def compute_score(data_source, solution_str, ground_truth, extra_info=None):
        return {"score": float(solution_str == ground_truth) * (2.0 if data_source == "math" else 1.0), "acc": 1}

    CONSTANT = 3
    '''
)


@pytest.fixture()
def plugin_dir(tmp_path):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "my_reward.py").write_text(PLUGIN)
    return tmp_path


def call(reward, completions, references, metas=None, prompts=None):
    n = len(completions)
    return reward(prompts or [""] * n, completions, references, metas or [{} for _ in range(n)])


def test_builtins_registered_with_one_line_descriptions():
    names = dict(list_rewards())
    for name in ("temporal_iou", "mean_iou", "dense_caption", "exact_match", "normalized_match", "token_f1",
                 "multi_needle", "numeric_match", "yes_no", "tool_outcome", "code_tests", "answer_tag",
                 "json_format", "regex_format"):
        assert name in names, name
        assert names[name] and "\n" not in names[name]
    table = rewards.format_reward_table().splitlines()
    assert table[0].split() == ["name", "description"]
    assert any(line.startswith("temporal_iou ") and names["temporal_iou"] in line for line in table)
    assert list_rewards() == sorted(list_rewards())


def test_register_rejects_duplicates_bad_descriptions_and_bad_signatures():
    with pytest.raises(ValueError, match="'temporal_iou' is already registered"):
        register_reward("temporal_iou", "again")(lambda completion, reference: 0.0)
    with pytest.raises(ValueError, match="one non-empty line"):
        register_reward("x_two_lines", "a\nb")
    with pytest.raises(RewardSpecError, match="expected"):
        register_reward("x_bad_sig", "bad")(lambda text, answer: 0.0)


def test_native_plugin_from_relative_file_path(plugin_dir):
    reward = get_reward("plugins/my_reward.py:native", base_dir=plugin_dir)
    assert reward.name == "plugins/my_reward.py:native" and not reward.batched
    assert call(reward, ["a", "b"], ["a", "a"], [{"bonus": 0.5}, {}]) == [1.5, 0.0]
    outcomes = reward.outcomes(["", ""], ["", "a"], ["a", "a"], [{}, {}])
    assert outcomes[0].invalid == ("plugins/my_reward.py:native: empty",) and outcomes[0].value == 0.0
    assert outcomes[1].value == 1.0 and not outcomes[1].invalid


def test_native_plugin_gets_only_declared_keys_and_prompt(plugin_dir):
    narrow = get_reward(str(plugin_dir / "plugins" / "my_reward.py") + ":native_narrow")
    assert call(narrow, ["a"], ["a"], [{"bonus": 1.0, "unrelated": "x"}]) == [2.0]
    with_prompt = get_reward("plugins/my_reward.py:native_with_prompt", base_dir=plugin_dir)
    assert call(with_prompt, ["say hi", "bye"], [None, None], prompts=["hi", "hi"]) == [1.0, 0.0]


def test_trl_plugin_gets_reference_ground_truth_and_metadata_columns(plugin_dir):
    reward = get_reward("plugins/my_reward.py:trl", base_dir=plugin_dir)
    assert reward.batched and detect_style(reward.fn) == "trl"
    # missing metadata keys become None in the column
    assert call(reward, ["x", "y", "z"], ["x", "q", "z"], [{"bonus": 1}, {}, {"bonus": 2}]) == [2.0, 0.0, 3.0]
    only = get_reward("plugins/my_reward.py:trl_completions_only", base_dir=plugin_dir)
    assert call(only, ["ab", "abcd"], [None, None]) == [2.0, 4.0]


def test_verl_plugin_data_source_and_score_dict(plugin_dir):
    reward = get_reward("plugins/my_reward.py:compute_score", base_dir=plugin_dir)
    metas = [{"data_source": "math"}, {"domain": "math"}, {"domain": "other"}]
    assert call(reward, ["7", "7", "7"], ["7", "7", "7"], metas) == [2.0, 2.0, 1.0]


def test_module_spec_and_callable_spec():
    reward = get_reward("rewards.retrieval:exact_match_reward")
    assert call(reward, ["Paris"], ["Paris"]) == [1.0]
    direct = get_reward(lambda completion, reference: float(len(completion)))
    assert call(direct, ["abc"], [None]) == [3.0]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_reward", "unknown reward 'no_such_reward'; registered: "),
        ("missing.py:fn", "file .*missing.py does not exist"),
        ("plugins/my_reward.py:nope", "has no attribute 'nope'"),
        ("plugins/my_reward.py:CONSTANT", "is a int, not a function"),
        ("no_such_pkg.mod:fn", "importing module 'no_such_pkg.mod' failed"),
        ("rewards.text:truncate", "expected fn\\(completion, reference"),
        (":fn", "expected 'module:function'"),
    ],
)
def test_bad_specs_name_the_spec_and_the_failure(plugin_dir, spec, message):
    with pytest.raises(RewardSpecError, match=message) as info:
        get_reward(spec, base_dir=plugin_dir)
    assert repr(spec) in str(info.value) or spec in str(info.value)


def test_plugin_file_that_fails_to_import(tmp_path):
    (tmp_path / "broken.py").write_text("import no_such_module_xyz\n")
    with pytest.raises(RewardSpecError, match="importing .*broken.py failed: ModuleNotFoundError"):
        get_reward("broken.py:f", base_dir=tmp_path)


def test_batch_reward_call_raises_on_errors_and_bad_values():
    def bad(completion, reference):
        if completion == "boom":
            return 1 / 0
        return {"nan": math.nan, "none": None, "str": "1", "inf": math.inf}[completion]

    reward = get_reward(bad)
    outcomes = reward.outcomes([""] * 4, ["nan", "none", "str", "inf"], [None] * 4, [{}] * 4)
    assert [o.error for o in outcomes] == [
        "returned non-finite value nan",
        "returned NoneType None, not a number",
        "returned str '1', not a number",
        "returned non-finite value inf",
    ]
    with pytest.raises(RewardError, match="reward .*bad.* failed on sample 0: ZeroDivisionError"):
        call(reward, ["boom"], [None])


def test_trl_wrong_length_and_non_list():
    short = get_reward(lambda prompts, completions, **kw: [1.0])
    assert all("returned 1 values for a batch of 2" == o.error for o in short.outcomes(["", ""], ["a", "b"], [0, 0], [{}, {}]))
    scalar = get_reward(lambda prompts, completions, **kw: 1.0)
    assert "not a list of 2 numbers" in scalar.outcomes(["", ""], ["a", "b"], [0, 0], [{}, {}])[0].error


def test_combine_weights_invalid_parts_and_yaml_form():
    def accuracy(completion, reference):
        if "?" in completion:
            raise InvalidAnswer("unsure")
        return float(reference in completion)

    reward = combine([(accuracy, 1.0), ("answer_tag", 0.25)])
    values = reward.outcomes(["", "", ""], ["<answer>x</answer>", "<answer>?</answer>", "y"], ["x", "x", "y"], [{}] * 3)
    assert values[0].value == pytest.approx(1.25) and not values[0].invalid
    assert values[1].value == pytest.approx(0.25) and values[1].invalid == ("test_combine_weights_invalid_parts_and_yaml_form.<locals>.accuracy: unsure",)
    assert values[2].value == pytest.approx(1.0)
    yaml_form = get_reward([{"reward": "exact_match", "weight": 2}, {"reward": "answer_tag"}])
    assert call(yaml_form, ["<answer>a</answer>"], ["a"]) == [3.0]
    with pytest.raises(ValueError, match="weight must be a number"):
        combine([{"reward": "exact_match", "weight": "high"}])
    with pytest.raises(ValueError, match="expected keys"):
        combine([{"rewrd": "exact_match"}])
    with pytest.raises(RewardSpecError, match="unknown reward"):
        combine([("nope", 1.0)])
