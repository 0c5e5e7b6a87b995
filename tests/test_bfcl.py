"""The BFCL AST checker (rewards.bfcl): decoding and the leaderboard's matching rules on known cases."""

import pytest

from rewards.bfcl import DecodeError, bfcl_ast, check_output, decode_calls, has_calls, standardize_string

WEATHER = {"name": "weather.get", "parameters": {"type": "dict", "required": ["city"], "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "scale": {"type": "float"},
    "metric": {"type": "boolean"}, "hours": {"type": "array", "items": {"type": "integer"}},
    "options": {"type": "dict", "properties": {}}}}}
SPOTIFY = {"name": "spotify.play", "parameters": {"type": "dict", "required": ["artist", "duration"], "properties": {
    "artist": {"type": "string"}, "duration": {"type": "integer"}}}}


def gt(**params):
    return [{"weather.get": params}]


def ok(text, truth, functions=(WEATHER,), category="simple_python"):
    return check_output(text, list(functions), truth, category).valid


def test_python_call_lists_decode_like_the_leaderboard():
    assert decode_calls("[weather.get(city='Paris', days=3)]") == [{"weather.get": {"city": "Paris", "days": 3}}]
    assert decode_calls("```\nf(a=1)\n```") == [{"f": {"a": 1}}]  # backticks and newlines stripped, [] added
    assert decode_calls("f(1, a=-2)") == [{"f": {"a": -2}}]  # positional arguments are not read
    assert decode_calls("f(a=2*3, b=(1, 2), c=x, d=g(1))") == [{"f": {"a": 6, "b": (1, 2), "c": "x", "d": "g(1)"}}]
    assert decode_calls("f(a=g(b=1))") == [{"f": {"a": {"g": {"b": 1}}}}]
    assert decode_calls("<think>maybe f(a=1)</think>[f(a=2)]") == [{"f": {"a": 2}}]
    assert decode_calls("[]") == []


def test_arithmetic_is_folded_without_running_code():
    with pytest.raises(DecodeError):
        decode_calls("f(a=1 + len('abc'))")
    with pytest.raises(DecodeError):
        decode_calls("f(a=2 ** 10 ** 10)")
    # a call without keywords is kept as text, never executed
    assert decode_calls("f(a=__import__('os').getcwd())") == [{"f": {"a": "__import__('os').getcwd()"}}]


def test_tool_call_tags_decode():
    text = ('<tool_call>\n{"name": "spotify.play", "arguments": {"artist": "Maroon 5", "duration": 15}}\n'
            '</tool_call>\n<tool_call>{"name": "spotify.play", "arguments": "{\\"artist\\": \\"ABBA\\", '
            '\\"duration\\": 3}"}</tool_call>')
    assert decode_calls(text) == [{"spotify.play": {"artist": "Maroon 5", "duration": 15}},
                                  {"spotify.play": {"artist": "ABBA", "duration": 3}}]
    assert decode_calls("<tool_call>not json</tool_call>") == []


def test_not_calls_fail_to_decode():
    for text in ("I cannot help with that.", "hello", "[1, 2]", "f(a=lambda x: x)"):
        with pytest.raises(DecodeError):
            decode_calls(text)
    assert not has_calls([]) and has_calls([{"f": {}}])


def test_string_standardisation():
    assert standardize_string("New York, NY") == standardize_string("new-york ny") == "newyorkny"
    assert standardize_string("it's") == 'it"s'
    assert ok("weather.get(city='new york, ny')", gt(city=["New York, NY"]))
    assert not ok("weather.get(city='Boston')", gt(city=["New York, NY"]))


def test_types_follow_the_checker():
    truth = gt(city=["Paris"], scale=[2.0, ""], days=[3, ""], metric=[True, ""])
    assert ok("weather.get(city='Paris', scale=2)", truth)  # int accepted for float
    assert not ok("weather.get(city='Paris', days=3.0)", truth)  # float for integer is a type error
    assert not ok("weather.get(city='Paris', days=True)", truth)  # bool is not an integer
    assert not ok("weather.get(city='Paris', metric=1)", truth)
    hours = gt(city=["Paris"], hours=[[1, 2], ""])
    assert ok("weather.get(city='Paris', hours=[1, 2])", hours)
    assert not ok("weather.get(city='Paris', hours=['1', '2'])", hours)  # nested element type
    assert not ok("weather.get(city='Paris', hours=[2, 1])", hours)  # list order matters
    # a value of the ground truth's own type is accepted as a "variable" and compared as is
    assert ok("weather.get(city='Paris', days='n_days')", gt(city=["Paris"], days=["n_days"]))


def test_parameters_required_optional_and_unexpected():
    truth = gt(city=["Paris"], days=[3, ""])
    assert ok("weather.get(city='Paris')", truth)  # "" marks the parameter as omissible
    assert not ok("weather.get(days=3)", truth)  # required parameter missing
    assert not ok("weather.get(city='Paris', scale=1.0)", truth)  # in schema but not in the ground truth
    assert not ok("weather.get(city='Paris', unit='C')", truth)  # not in the schema
    assert not ok("weather.get(city='Paris')", gt(city=["Paris"], days=[3]))  # non-omissible optional
    assert not ok("weather.getx(city='Paris')", truth)  # wrong function name


def test_dict_values():
    truth = gt(city=["Paris"], options=[{"unit": ["C", "celsius"], "lang": ["en", ""]}])
    assert ok("weather.get(city='Paris', options={'unit': 'Celsius'})", truth)
    assert not ok("weather.get(city='Paris', options={'unit': 'F'})", truth)
    assert not ok("weather.get(city='Paris', options={'lang': 'en'})", truth)  # 'unit' missing


def test_parallel_calls_match_in_any_order_and_count_must_agree():
    truth = [{"spotify.play": {"artist": ["Taylor Swift"], "duration": [20]}},
             {"spotify.play": {"artist": ["Maroon 5"], "duration": [15]}}]
    fns = (SPOTIFY,)
    swapped = "[spotify.play(artist='Maroon 5', duration=15), spotify.play(artist='Taylor Swift', duration=20)]"
    assert ok(swapped, truth, fns, "parallel")
    assert not ok("[spotify.play(artist='Maroon 5', duration=15)]", truth, fns, "parallel")
    twice = "[spotify.play(artist='Maroon 5', duration=15), spotify.play(artist='Maroon 5', duration=15)]"
    assert not ok(twice, truth, fns, "parallel")  # one-to-one
    # the simple categories need exactly one call
    one = [{"spotify.play": {"artist": ["ABBA"], "duration": [3]}}]
    assert not ok("[spotify.play(artist='ABBA', duration=3), spotify.play(artist='ABBA', duration=3)]", one, fns)


def test_multiple_checks_the_expected_function_among_several():
    truth = [{"spotify.play": {"artist": ["ABBA"], "duration": [3]}}]
    assert ok("spotify.play(artist='ABBA', duration=3)", truth, (WEATHER, SPOTIFY), "multiple")
    assert not ok("weather.get(city='ABBA')", truth, (WEATHER, SPOTIFY), "multiple")


def test_irrelevance_succeeds_when_no_call_is_decoded():
    assert ok("Sorry, none of these functions can compute that.", None, category="irrelevance")
    assert ok("[]", None, category="irrelevance")
    assert not ok("weather.get(city='Paris')", None, category="irrelevance")
    assert not ok('<tool_call>{"name": "weather.get", "arguments": {"city": "Paris"}}</tool_call>', None,
                  category="irrelevance")


def test_decode_failure_is_wrong_for_answerable_categories():
    result = check_output("The weather is nice.", [WEATHER], gt(city=["Paris"]), "simple_python")
    assert not result.valid and result.error_type == "decode_failed"


def test_reward_function_and_registration():
    ref = {"category": "simple_python", "functions": [WEATHER], "ground_truth": gt(city=["Paris"])}
    assert bfcl_ast("[weather.get(city='paris')]", ref) == 1.0
    assert bfcl_ast("[weather.get(city='Rome')]", ref) == 0.0
    assert bfcl_ast("no call", {"category": "irrelevance", "functions": [WEATHER]}) == 1.0
    registry = pytest.importorskip("rewards.registry")
    assert "bfcl_ast" in dict(registry.list_rewards())
