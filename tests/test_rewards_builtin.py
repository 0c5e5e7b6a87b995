"""Built-in rewards on known cases (values computed by hand in the comments) and malformed answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rewards import InvalidAnswer, ToolError, call_tool, get_reward, tool_schemas
from rewards.agent import parse_tool_calls, tool_outcome_reward
from rewards.captioning import dense_caption_reward, parse_events
from rewards.format import answer_tag_reward, json_format_reward, regex_format_reward, think_answer_format_reward
from rewards.reasoning import (
    extract_choice,
    extract_number,
    extract_yes_no,
    multiple_choice_reward,
    numeric_match_reward,
    yes_no_reward,
)
from rewards.retrieval import (
    exact_match_reward,
    multi_needle_reward,
    normalized_match_reward,
    token_f1_reward,
)
from rewards.temporal import (
    grounding_metrics,
    max_weight_matching,
    mean_iou_reward,
    mean_matched_iou,
    parse_intervals,
    temporal_iou,
    temporal_iou_reward,
)
from rewards.tools import safe_eval

# --- temporal ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[12.5, 30]", [(12.5, 30.0)]),
        ("(12.5, 30)", [(12.5, 30.0)]),
        ("It happens at 12.5-30s.", [(12.5, 30.0)]),
        ("12.5 - 30 seconds", [(12.5, 30.0)]),
        ("from 00:12 to 00:30", [(12.0, 30.0)]),
        ("0:01:05.5 - 0:01:10", [(65.5, 70.0)]),
        ("12.5 to 30", [(12.5, 30.0)]),
        ("between 3 and 4.5 seconds", [(3.0, 4.5)]),
        ('{"start": 1.5, "end": 2}', [(1.5, 2.0)]),
        ("start time: 3.2s, end time: 7.9s", [(3.2, 7.9)]),
        ("first [1, 2], then (3.5,4), 5s-6s and finally 01:00 to 01:30", [(1, 2), (3.5, 4), (5, 6), (60, 90)]),
        ("30 - 12.5", [(12.5, 30.0)]),  # written backwards: swapped back
        ("The person opens the door at 12 seconds.", []),
        ("", []),
    ],
)
def test_parse_intervals(text, expected):
    assert parse_intervals(text) == [(float(a), float(b)) for a, b in expected]


def test_temporal_iou_known_cases():
    assert temporal_iou((0, 10), (5, 15)) == pytest.approx(5 / 15)
    assert temporal_iou((0, 10), (0, 10)) == 1.0
    assert temporal_iou((0, 5), (6, 10)) == 0.0  # disjoint
    assert temporal_iou((0, 5), (5, 10)) == 0.0  # touching
    assert temporal_iou((3, 3), (0, 10)) == 0.0  # zero-length inside a span
    assert temporal_iou((3, 3), (3, 3)) == 1.0  # identical points
    assert temporal_iou((4, 4), (3, 3)) == 0.0
    # clipping to [0, duration]: (-5, 20) -> (0, 12) vs (6, 12) -> 6/12
    assert temporal_iou((-5, 20), (6, 12), duration=12) == pytest.approx(0.5)
    assert temporal_iou((-5, 20), (6, 12)) == pytest.approx(6 / 20)  # negative times always clip to 0


def test_temporal_iou_reward():
    assert temporal_iou_reward("<think>maybe [0, 100]</think><answer>[5, 15]</answer>", [0, 10]) == pytest.approx(1 / 3)
    # first predicted interval only
    assert temporal_iou_reward("[0, 10] or maybe [20, 30]", [20, 30]) == 0.0
    # several reference windows (QVHighlights): the best one counts
    assert temporal_iou_reward("from 20 to 30", [[0, 10], [22, 30]]) == pytest.approx(0.8)
    assert temporal_iou_reward("12.5 to 40", {"window": [12.5, 30]}, duration=30) == 1.0
    assert temporal_iou_reward("[0, 5]", np.array([0.0, 10.0])) == 0.5
    assert temporal_iou_reward("[0, 5]", np.array([[0, 10], [0, 5]])) == 1.0
    with pytest.raises(InvalidAnswer, match="no interval found"):
        temporal_iou_reward("I cannot tell.", [0, 10])
    with pytest.raises(ValueError, match="holds no interval"):
        temporal_iou_reward("[1, 2]", "nothing")


def test_hungarian_matching_beats_greedy():
    # greedy takes (0,0)=0.9 then (1,1)=0.1 -> 1.0; optimal is (0,1)+(1,0) = 0.8+0.8 = 1.6
    weights = [[0.9, 0.8], [0.8, 0.1]]
    assert max_weight_matching(weights) == [(0, 1), (1, 0)]
    assert max_weight_matching([[0.2, 0.5, 0.1]]) == [(0, 1)]
    assert max_weight_matching([[0.2], [0.7]]) == [(1, 0)]


def test_mean_iou():
    # pred (0,10),(20,30) vs truth (20,30),(0,5),(40,50): matched IoUs 1.0 and 0.5, divided by 3
    assert mean_matched_iou([(0, 10), (20, 30)], [(20, 30), (0, 5), (40, 50)]) == pytest.approx(1.5 / 3)
    assert mean_iou_reward("[0, 10] and [20, 30]", [[20, 30], [0, 10]]) == 1.0
    with pytest.raises(InvalidAnswer):
        mean_iou_reward("none", [[0, 1]])


def test_grounding_metrics_percent():
    metrics = grounding_metrics([0.2, 0.3, 0.55, 0.8])
    assert metrics == {"R1@0.3": 75.0, "R1@0.5": 50.0, "R1@0.7": 25.0, "mIoU": pytest.approx(46.25)}
    with pytest.raises(ValueError):
        grounding_metrics([])
    with pytest.raises(ValueError):
        grounding_metrics([1.5])


# --- dense captioning -------------------------------------------------------------------------------------------


def test_parse_events():
    text = "[0.0, 4.0] a red square appears\n[4.0, 8.0]: the square turns blue.\n10-12s - it vanishes"
    events = parse_events(text)
    assert [(e.start, e.end, e.caption) for e in events] == [
        (0.0, 4.0, "a red square appears"),
        (4.0, 8.0, "the square turns blue"),
        (10.0, 12.0, "it vanishes"),
    ]


def test_dense_caption_reward_hand_computed():
    reference = [
        {"start": 0, "end": 4, "caption": "a red square appears"},
        {"timestamp": [4, 8], "sentence": "the square turns blue"},
    ]
    # event 1: IoU 1 x F1 1 = 1; event 2: pred (4, 6) IoU 0.5, caption "the square turns green"
    # F1: 3 common of 4/4 tokens -> 0.75; best 0.5 * 0.75 = 0.375. Mean (1 + 0.375) / 2 = 0.6875
    completion = "[0, 4] A red square appears. [4, 6] the square turns green"
    assert dense_caption_reward(completion, reference) == pytest.approx(0.6875)
    assert dense_caption_reward(completion, [[0, 4, "a red square appears"]]) == 1.0
    assert dense_caption_reward("[20, 30] a red square appears", reference) == 0.0
    with pytest.raises(InvalidAnswer, match="no timestamped event"):
        dense_caption_reward("a red square appears", reference)
    with pytest.raises(ValueError):
        dense_caption_reward("[0, 4] x", [{"caption": "no time"}])


# --- retrieval --------------------------------------------------------------------------------------------------


def test_retrieval_rewards():
    assert exact_match_reward(" Paris ", "Paris") == 1.0
    assert exact_match_reward("paris", "Paris") == 0.0
    assert exact_match_reward("Lutetia", ["Paris", "Lutetia"]) == 1.0
    assert normalized_match_reward("<answer>  the  CODE is: 7-ALPHA! </answer>", "the code is 7 alpha") == 1.0
    assert normalized_match_reward("Paris, France", "Paris") == 0.0
    # pred tokens [the, cat, sat], ref [a, cat, sat, down]: 2 common, P 2/3, R 2/4 -> F1 4/7
    assert token_f1_reward("The cat sat", "a cat sat down") == pytest.approx(4 / 7)
    assert token_f1_reward("The cat sat", ["dog", "the cat sat"]) == 1.0
    assert multi_needle_reward("The codes are 1234 and blue-fox.", ["1234", "Blue fox", "9999"]) == pytest.approx(2 / 3)
    assert multi_needle_reward("12345", ["1234"]) == 0.0  # whole words only
    for fn in (exact_match_reward, normalized_match_reward, token_f1_reward, multi_needle_reward):
        with pytest.raises(InvalidAnswer, match="empty answer"):
            fn("<think>hmm</think>  ", "x")


# --- reasoning --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, number",
    [
        ("The total is 12 apples, then 15.", 15.0),  # free text: last number
        ("Answer: 42 (about 40)", 42.0),  # explicit: first number after the cue
        ("so \\boxed{1,234.5} is it. Check: 7", 1234.5),
        ("\\boxed{\\frac{3}{4}}", 0.75),
        ("The final answer is -3/4.", -0.75),
        ("value 1e-3", 0.001),
        ("<think>maybe 5</think><answer>6</answer>", 6.0),
        ("no digits here", None),
    ],
)
def test_extract_number(text, number):
    assert extract_number(text) == number


def test_numeric_match_reward():
    assert numeric_match_reward("Answer: 3.0000001", 3) == 1.0
    assert numeric_match_reward("Answer: 3.01", 3) == 0.0
    assert numeric_match_reward("Answer: 3.01", {"answer": 3, "tolerance": 0.05}) == 1.0
    assert numeric_match_reward("Answer: 3.01", "3", atol=0.1) == 1.0
    assert numeric_match_reward("it is 1/0 or 7", "7") == 1.0  # 1/0 is skipped, not a crash
    with pytest.raises(InvalidAnswer, match="no number"):
        numeric_match_reward("I don't know", 3)


def test_yes_no_and_choice():
    assert extract_yes_no("Yes, the man is wearing a hat.") == "yes"
    assert extract_yes_no("Answer: no") == "no"
    assert extract_yes_no("No. Yes would be wrong.") == "no"
    assert extract_yes_no("It could be yes or no.") is None
    assert yes_no_reward("<answer>Yes</answer>", True) == 1.0
    assert yes_no_reward("no", "yes") == 0.0
    with pytest.raises(InvalidAnswer):
        yes_no_reward("Perhaps.", "yes")
    assert extract_choice("(B) the dog") == "B"
    assert extract_choice("Answer: C. red") == "C"
    assert extract_choice("I pick option D") == "D"
    assert extract_choice("A cat, so (C)") == "C"
    assert extract_choice("I think it is (A).") == "A"
    assert multiple_choice_reward("\\boxed{B}", "b") == 1.0
    with pytest.raises(InvalidAnswer):
        multiple_choice_reward("no idea", "A")


# --- format -----------------------------------------------------------------------------------------------------


def test_format_rewards():
    assert answer_tag_reward("<think>x</think><answer>42</answer>") == 1.0
    assert answer_tag_reward("<answer> </answer>") == 0.0
    assert answer_tag_reward("<answer>1</answer><answer>2</answer>") == 0.0
    assert answer_tag_reward("<box>1</box>", format_tag="box") == 1.0
    assert think_answer_format_reward("<think>a</think>\n<answer>b</answer>") == 1.0
    assert think_answer_format_reward("preamble <think>a</think><answer>b</answer>") == 0.0
    assert regex_format_reward("ID-123", format_regex=r"ID-\d+") == 1.0
    assert regex_format_reward("ID-12x", format_regex=r"ID-\d+") == 0.0
    with pytest.raises(ValueError, match="format_regex"):
        regex_format_reward("x")
    assert json_format_reward('{"a": 1}') == 1.0
    assert json_format_reward('Here:\n```json\n[1, 2]\n```') == 1.0
    assert json_format_reward("{'a': 1}") == 0.0


# --- tools and agent --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expression, value",
    [("1 + 2 * 3", 7), ("(1 + 2) * 3", 9), ("7 / 2", 3.5), ("7 // 2", 3), ("-7 % 3", 2), ("2 ** 10", 1024),
     ("2 ^ 3", 8), ("-(3.5 - 1)", -2.5), ("2 ** -1", 0.5)],
)
def test_calculator(expression, value):
    assert safe_eval(expression) == value


@pytest.mark.parametrize(
    "expression, message",
    [("9 ** 9 ** 9", "would exceed 4096 bits"), ("2 ** 4000 * 2 ** 4000", "exceeds 4096 bits"),
     ("2 ** (2 ** 4000)", "would exceed"), ("2 ** 1e300", "overflows"), ("1 / 0", "division by zero"), ("__import__('os')", "unsupported syntax Call"),
     ("a + 1", "unsupported syntax Name"), ("'a' * 3", "unsupported syntax Constant"), ("1 +", "cannot parse"),
     ("10.0 ** 400", "overflows"), ("(-8) ** 0.5", "complex"), ("", "empty"), ("1" * 600, "longer than"),
     ("True + 1", "unsupported syntax Constant")],
)
def test_calculator_rejects(expression, message):
    with pytest.raises(ToolError, match=message):
        safe_eval(expression)


def test_lookup_and_argument_validation():
    env = {"tables": {"Capital": {"France": "Paris"}}}
    assert call_tool("lookup", {"table": "capital", "key": " FRANCE "}, env) == "Paris"
    with pytest.raises(ToolError, match="has no key 'Spain'"):
        call_tool("lookup", {"table": "capital", "key": "Spain"}, env)
    with pytest.raises(ToolError, match="no table 'size'"):
        call_tool("lookup", {"table": "size", "key": "x"}, env)
    with pytest.raises(ToolError, match="missing argument"):
        call_tool("lookup", {"table": "capital"}, env)
    with pytest.raises(ToolError, match="argument 'key' should be string"):
        call_tool("lookup", {"table": "capital", "key": 3}, env)
    with pytest.raises(ToolError, match="unknown argument 'extra'"):
        call_tool("calculator", {"expression": "1", "extra": 1})
    with pytest.raises(ToolError, match="unknown tool 'web'"):
        call_tool("web", {})
    schema = tool_schemas(["calculator"])[0]
    assert schema["function"]["name"] == "calculator" and schema["function"]["parameters"]["required"] == ["expression"]


def test_parse_tool_calls():
    text = ('<think>use tools</think><tool_call>\n{"name": "calculator", "arguments": {"expression": "1+1"}}\n'
            '</tool_call>\n<tool_call>{"name": "lookup", "arguments": "{\\"table\\": \\"t\\", \\"key\\": \\"k\\"}"}</tool_call>')
    calls = parse_tool_calls(text)
    assert [(c.name, c.arguments) for c in calls] == [
        ("calculator", {"expression": "1+1"}),
        ("lookup", {"table": "t", "key": "k"}),
    ]
    bare = parse_tool_calls('```json\n{"name": "calculator", "arguments": {"expression": "2"}}\n```')
    assert bare[0].name == "calculator"
    with pytest.raises(InvalidAnswer, match="no tool call"):
        parse_tool_calls('{"name": "calculator", "arguments": {}}', bare_json=False)
    with pytest.raises(InvalidAnswer, match="not valid JSON"):
        parse_tool_calls('<tool_call>{"name": "calculator", "arguments": {expression: 1}}</tool_call>')
    with pytest.raises(InvalidAnswer, match="no 'name'"):
        parse_tool_calls('<tool_call>{"arguments": {}}</tool_call>')
    with pytest.raises(InvalidAnswer, match="no tool call"):
        parse_tool_calls("The answer is 4.")


def test_tool_outcome_reward():
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "(2 + 3) * 4"}}</tool_call>'
    assert tool_outcome_reward(call, {"answer": 20}) == 1.0
    assert tool_outcome_reward(call, {"answer": "20.0000001"}) == 1.0
    assert tool_outcome_reward(call, {"answer": 21}) == 0.0
    env = {"tables": {"capital": {"france": "paris"}}}
    lookup = '{"name": "lookup", "arguments": {"table": "capital", "key": "France"}}'
    assert tool_outcome_reward(lookup, {"answer": "Paris"}, tool_env=env) == 1.0
    both = call + '<tool_call>' + lookup + '</tool_call>'
    assert tool_outcome_reward(both, {"answer": "paris"}, tool_env=env) == 1.0  # last call's result
    assert tool_outcome_reward(both, {"answers": [20, "Rome"]}, tool_env=env) == 0.5
    assert tool_outcome_reward(call, {"answers": [20, "paris"]}, tool_env=env) == 0.5  # missing call costs
    with pytest.raises(InvalidAnswer, match="not offered"):
        tool_outcome_reward(call, {"answer": 20}, allowed_tools=["lookup"])
    with pytest.raises(InvalidAnswer, match="unknown tool 'search'"):
        tool_outcome_reward('{"name": "search", "arguments": {}}', {"answer": 1})
    with pytest.raises(InvalidAnswer, match="missing argument"):
        tool_outcome_reward('{"name": "calculator", "arguments": {}}', {"answer": 1})
    with pytest.raises(InvalidAnswer, match="division by zero"):
        tool_outcome_reward('{"name": "calculator", "arguments": {"expression": "1/0"}}', {"answer": 1})


def test_registered_names_resolve_to_these_functions():
    reward = get_reward("tool_outcome")
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "6*7"}}</tool_call>'
    assert reward([""], [call], [{"answer": 42}], [{}]) == [1.0]


# --- real annotations -------------------------------------------------------------------------------------------

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.skipif(not (DATA / "charades_sta" / "charades_sta_test.txt").exists(), reason="shared data absent")
def test_charades_sta_windows_round_trip_through_every_written_form():
    lines = (DATA / "charades_sta" / "charades_sta_test.txt").read_text().splitlines()[:300]
    ious = []
    for line in lines:
        annotation, _sentence = line.split("##")
        _vid, start, end = annotation.split(" ")
        truth = (float(start), float(end))
        minutes = f"{int(truth[0] // 60)}:{truth[0] % 60:04.1f} to {int(truth[1] // 60)}:{truth[1] % 60:04.1f}"
        for text in (f"[{start}, {end}]", f"{start}-{end}s", f"from {start} to {end} seconds", minutes):
            (parsed,) = parse_intervals(f"The moment is {text}.")
            assert parsed == pytest.approx(truth), (line, text)
        ious.append(temporal_iou_reward(f"<answer>{start} - {end}</answer>", [truth[0] + 1.0, truth[1]]))
    expected = [(float(e) - float(s) - 1.0) / (float(e) - float(s)) for s, e in
                (line.split("##")[0].split(" ")[1:] for line in lines)]
    assert ious == pytest.approx(expected)  # shifted start by 1 s: IoU = (len - 1) / len


@pytest.mark.skipif(not (DATA / "qvhighlights" / "highlight_val_release.jsonl").exists(), reason="shared data absent")
def test_qvhighlights_multi_window_references():
    rows = [json.loads(line) for line in (DATA / "qvhighlights" / "highlight_val_release.jsonl").open()][:200]
    for row in rows:
        windows = row["relevant_windows"]
        last = windows[-1]
        # predicting any one GT window scores 1 against the list; all of them score 1 under mean_iou
        assert temporal_iou_reward(f"[{last[0]}, {last[1]}]", windows, duration=row["duration"]) == 1.0
        text = " and ".join(f"[{s}, {e}]" for s, e in windows[::-1])
        assert mean_iou_reward(text, windows) == pytest.approx(1.0)
