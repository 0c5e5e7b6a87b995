"""Sandbox and the code_tests reward: bad programs cost their time limit and score 0, never hang the caller."""

from __future__ import annotations

import time

import pytest

from rewards import InvalidAnswer, RewardScorer
from rewards.sandbox import code_tests_reward, extract_code, network_isolation, run_python

TESTS = {"tests": ["assert f(1) == 2", "assert f(2) == 3", "assert f(-1) == 0"]}


def fenced(body: str) -> str:
    return f"Here is my solution:\n```python\n{body}\n```\nDone."


def pid_gone(pid: int, wait_s: float = 3.0) -> bool:
    """True once `pid` no longer runs (exited, or a zombie waiting for whoever reaps orphans)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as handle:
                state = handle.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def test_run_python_statuses():
    ok = run_python("print(input()[::-1])", stdin="abc\n")
    assert (ok.status, ok.stdout, ok.returncode) == ("ok", "cba\n", 0)
    crash = run_python("raise ValueError('bad')")
    assert crash.status == "error" and "ValueError: bad" in crash.stderr
    start = time.monotonic()
    loop = run_python("while True:\n    pass", timeout_s=1)
    assert loop.status == "timeout" and time.monotonic() - start < 3
    bomb = run_python("blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 2**20))", memory_mb=256, timeout_s=5)
    assert bomb.status == "memory"
    flood = run_python("while True:\n    print('x' * 1000)", output_limit_bytes=100_000, timeout_s=5)
    assert flood.status == "output_limit" and len(flood.stdout) <= 100_000


def test_run_python_fresh_dir_and_minimal_env():
    result = run_python("import os, sys\nprint(sorted(os.listdir('.')))\nprint('SECRET_TOKEN' in os.environ)")
    assert result.stdout.splitlines() == ["['main.py']", "False"]


def test_background_children_are_killed():
    code = "import os, time\npid = os.fork()\nif pid == 0:\n    time.sleep(60)\nelse:\n    print(pid)"
    result = run_python(code)
    assert result.status == "ok"
    assert pid_gone(int(result.stdout))


@pytest.mark.skipif(network_isolation() == "none", reason="no network namespace available here")
def test_no_network():
    code = "import socket\ntry:\n    socket.create_connection(('1.1.1.1', 53), timeout=2)\n    print('connected')\n" \
           "except OSError as exc:\n    print('blocked', exc.errno)"
    assert run_python(code).stdout.startswith("blocked")


def test_extract_code():
    assert extract_code("```python\na = 1\n```\n```py\nb = 2\n```") == "b = 2\n"
    assert extract_code("text\n```\nc = 3\n```") == "c = 3\n"
    assert extract_code("<think>```python\nx\n```</think>d = 4") == "d = 4"


def test_code_tests_correct_partial_crash():
    assert code_tests_reward(fenced("def f(x):\n    return x + 1"), TESTS) == 1.0
    assert code_tests_reward(fenced("def f(x):\n    return abs(x) + 1"), TESTS) == pytest.approx(2 / 3)
    assert code_tests_reward(fenced("import os\nos._exit(1)"), TESTS) == 0.0
    assert code_tests_reward(fenced("def f(x):\n    raise SystemExit"), TESTS) == 0.0
    assert code_tests_reward(fenced("def f(x):\n    return x + 1"), ["assert f(0) == 1"]) == 1.0  # bare list
    with pytest.raises(InvalidAnswer, match="syntax error"):
        code_tests_reward(fenced("def f(x:\n    return"), TESTS)
    with pytest.raises(InvalidAnswer, match="no code"):
        code_tests_reward("   ", TESTS)


def test_code_tests_hang_and_memory_bomb_score_zero_quickly():
    start = time.monotonic()
    # one hanging test fails alone; the others still run
    assert code_tests_reward(fenced("def f(x):\n    while x < 0:\n        pass\n    return x + 1"), TESTS,
                             test_timeout_s=0.5) == pytest.approx(2 / 3)
    assert code_tests_reward(fenced("while True:\n    pass"), TESTS, test_timeout_s=0.5) == 0.0
    assert code_tests_reward(fenced("x = bytearray(10**11)\ndef f(x):\n    return x + 1"), TESTS) == 0.0
    assert time.monotonic() - start < 5


def test_code_tests_stdin_stdout():
    io = {"io": [{"input": "1 2\n", "output": "3"}, {"input": "5 5\n", "output": "10\n"}]}
    assert code_tests_reward("a, b = map(int, input().split())\nprint(a + b)", io) == 1.0
    assert code_tests_reward("print(3)", io) == 0.5
    apps = {"inputs": ["2\n"], "outputs": ["4\n"]}
    assert code_tests_reward("print(int(input()) ** 2)", apps) == 1.0
    assert code_tests_reward("while True:\n    pass", apps, test_timeout_s=0.5) == 0.0


def test_killed_worker_takes_its_sandboxed_program_down(tmp_path):
    pid_file = tmp_path / "pid"
    program = fenced(f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(60)\n"
                     "def f(x):\n    return x + 1")
    batch = [{"id": "slow", "domain": "code", "prompt": "", "completion": program,
              "reference": {"tests": ["assert f(1) == 2"], "test_timeout_s": 30, "total_timeout_s": 30},
              "metadata": {}}]
    with RewardScorer({"code": "code_tests"}, num_workers=1, timeout_s=1.5, on_error="zero") as scorer:
        result = scorer.score(batch)
    assert result.failed.tolist() == [True] and "timed out after 1.5s" in result.errors[0]
    assert pid_gone(int(pid_file.read_text()))


def test_code_tests_through_scorer_workers():
    batch = [
        {"id": f"c{i}", "domain": "code", "prompt": "", "completion": fenced(body), "reference": TESTS,
         "metadata": {"test_timeout_s": 0.5}}
        for i, body in enumerate(["def f(x):\n    return x + 1", "while True:\n    pass", "def f(x):\n    return 0"])
    ]
    with RewardScorer({"code": "code_tests"}, num_workers=2) as scorer:
        result = scorer.score(batch)
    assert result.rewards.tolist() == pytest.approx([1.0, 0.0, 1 / 3])
