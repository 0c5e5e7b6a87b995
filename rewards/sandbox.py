"""Run untrusted Python (model-written code) in a limited subprocess, and the `code_tests` reward built on it.

Limits, all best effort on Linux (what a trainer needs is "a bad program costs at most its time limit", not a
security boundary against code written to escape):

- wall-clock limit: the whole process group is SIGKILLed when it expires; RLIMIT_CPU backs it up;
- memory: RLIMIT_AS (address space), so an allocation past the limit raises MemoryError or kills the program;
- output: stdout/stderr go to unnamed temporary files capped by RLIMIT_FSIZE (a print loop is killed by SIGXFSZ
  instead of filling memory); no core dumps;
- network: the program runs under `unshare -rn` (a fresh user + network namespace with no interfaces) when that
  works on this machine, else `unshare -n` (as root), else WITHOUT network isolation (checked once per process;
  `network_isolation()` tells which);
- a fresh temporary working directory (deleted afterwards), a minimal environment, `python -I` (no user site,
  no PYTHON* variables);
- the parent-death signal is set, so a program outlives neither a killed reward worker nor the trainer.

Not covered: process-count limits (RLIMIT_NPROC counts the user's processes machine-wide, so a low value would
break the trainer); a fork bomb is bounded only by the wall-clock kill of its process group.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
import os
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from functools import lru_cache
from typing import Any, NamedTuple

from rewards.errors import InvalidAnswer
from rewards.registry import register_reward

_PR_SET_PDEATHSIG = 1


class SandboxResult(NamedTuple):
    """status: "ok" (exit 0), "error" (non-zero exit / killed by a signal), "timeout" (wall or CPU limit),
    "memory" (MemoryError or allocation refused), "output_limit" (wrote past the output cap)."""

    status: str
    stdout: str
    stderr: str
    returncode: int | None = None
    duration_s: float = 0.0


@lru_cache(maxsize=1)
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name, use_errno=True) if name else None
    except OSError:
        return None


@lru_cache(maxsize=1)
def _unshare_prefix() -> tuple[str, ...]:
    """The command prefix that drops network access here, or () when none works."""
    exe = shutil.which("unshare")
    if exe is None or not sys.platform.startswith("linux"):
        return ()
    for prefix in ((exe, "-rn"), (exe, "-n")):
        try:
            done = subprocess.run([*prefix, "true"], capture_output=True, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            continue
        if done.returncode == 0:
            return prefix
    return ()


def network_isolation() -> str:
    """How the sandbox cuts the network on this machine: "unshare -rn", "unshare -n" or "none"."""
    prefix = _unshare_prefix()
    return " ".join(["unshare", *prefix[1:]]) if prefix else "none"


def _preexec(memory_bytes: int, cpu_s: int, output_bytes: int, libc: Any):
    def apply() -> None:  # runs in the child between fork and exec: async-signal-safe calls only
        os.setsid()
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (output_bytes, output_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    return apply


def _read(handle: Any, limit: int) -> str:
    handle.seek(0)
    return handle.read(limit).decode("utf-8", errors="replace")


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_python(
    code: str,
    stdin: str = "",
    timeout_s: float = 5.0,
    memory_mb: int = 1024,
    cpu_s: float | None = None,
    output_limit_bytes: int = 1 << 20,
    files: dict[str, str] | None = None,
    args: tuple[str, ...] = (),
    pass_fds: tuple[int, ...] = (),
    isolate_network: bool = True,
) -> SandboxResult:
    """Run `code` as `main.py` in a fresh temporary directory with the limits above.

    files: extra files written next to `main.py` (name -> text). pass_fds: descriptors the program inherits
    (the test harness reports through one). cpu_s defaults to the wall limit rounded up.
    """
    workdir = tempfile.mkdtemp(prefix="reward_sandbox_")
    start = time.monotonic()
    try:
        for name, text in {"main.py": code, **(files or {})}.items():
            with open(os.path.join(workdir, name), "w", encoding="utf-8") as handle:
                handle.write(text)
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": workdir,
            "TMPDIR": workdir,
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        prefix = _unshare_prefix() if isolate_network else ()
        command = [*prefix, sys.executable, "-I", "-X", "utf8", "main.py", *args]
        cpu_limit = math.ceil(cpu_s if cpu_s is not None else timeout_s) + 1
        with tempfile.TemporaryFile() as fin, tempfile.TemporaryFile() as fout, tempfile.TemporaryFile() as ferr:
            fin.write(stdin.encode("utf-8"))
            fin.seek(0)
            proc = subprocess.Popen(
                command,
                stdin=fin,
                stdout=fout,
                stderr=ferr,
                cwd=workdir,
                env=env,
                pass_fds=pass_fds,
                # preexec_fn is only unsafe with threads running; reward workers are single-threaded
                preexec_fn=_preexec(memory_mb << 20, cpu_limit, output_limit_bytes, _libc()),  # noqa: PLW1509
            )
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(proc.pid)  # also takes out children left running in the background
            proc.wait()
            stdout, stderr = _read(fout, output_limit_bytes), _read(ferr, output_limit_bytes)
        return SandboxResult(_status(proc.returncode, timed_out, stderr), stdout, stderr, proc.returncode,
                             time.monotonic() - start)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _status(returncode: int, timed_out: bool, stderr: str) -> str:
    if timed_out or returncode in (-signal.SIGXCPU,):
        return "timeout"
    if returncode == -signal.SIGXFSZ or "[Errno 27] File too large" in stderr[-2000:]:
        return "output_limit"
    if returncode == 0:
        return "ok"
    if "MemoryError" in stderr[-2000:] or "Cannot allocate memory" in stderr[-2000:]:
        return "memory"
    return "error"


# --- code_tests reward ------------------------------------------------------------------------------------------

_HARNESS = r'''
import json, os, signal, sys

class _TestTimeout(BaseException):
    pass

def _on_alarm(signum, frame):
    raise _TestTimeout()

def _main():
    fd, per_test = int(sys.argv[1]), float(sys.argv[2])
    nonce = sys.stdin.readline().strip()
    report = os.fdopen(fd, "w", buffering=1)
    with open("tests.json", encoding="utf-8") as handle:
        spec = json.load(handle)
    with open("solution.py", encoding="utf-8") as handle:
        source = handle.read()
    sys.argv[:] = ["solution.py"]
    signal.signal(signal.SIGALRM, _on_alarm)
    namespace = {"__name__": "solution", "__builtins__": __builtins__}

    def guarded(code, name):
        signal.setitimer(signal.ITIMER_REAL, per_test)
        try:
            exec(compile(code, name, "exec"), namespace)
            return "PASS"
        except _TestTimeout:
            return "TIMEOUT"
        except BaseException as exc:
            return type(exc).__name__
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    status = guarded(source + "\n" + spec["setup"], "solution.py")
    report.write(nonce + " load " + status + "\n")
    if status != "PASS":
        return
    for i, test in enumerate(spec["tests"]):
        report.write(nonce + " " + str(i) + " " + guarded(test, "test_" + str(i)) + "\n")

_main()
'''

_FENCED = re.compile(r"```([\w+-]*)[ \t]*\n(.*?)```", re.DOTALL)
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)


def extract_code(text: str) -> str:
    """The last ```python (or ```py / ```python3) block; else the last unlabelled ``` block; else the whole text
    without `<think>` blocks."""
    text = _THINK.sub("", text)
    blocks = _FENCED.findall(text)
    python = [body for lang, body in blocks if lang.lower() in ("python", "py", "python3")]
    unlabelled = [body for lang, body in blocks if not lang]
    if python:
        return python[-1]
    if unlabelled:
        return unlabelled[-1]
    return text.strip()


def run_assert_tests(
    code: str, tests: list[str], setup: str = "", timeout_s: float = 2.0, total_timeout_s: float = 8.0,
    memory_mb: int = 1024,
) -> list[bool]:
    """Pass/fail per test: the solution is exec'd once in one sandboxed process, then each test runs in its
    namespace under its own `timeout_s` alarm; a test that hangs, raises or kills the process fails (and so do
    the tests it prevented from running). The whole process gets at most `total_timeout_s`."""
    if not tests:
        return []
    read_fd, write_fd = os.pipe()
    nonce = secrets.token_hex(8)
    wall = min(total_timeout_s, timeout_s * (len(tests) + 1) + 1.0)
    try:
        os.set_inheritable(write_fd, True)
        run_python(
            _HARNESS,
            stdin=nonce + "\n",
            timeout_s=wall,
            memory_mb=memory_mb,
            files={"solution.py": code, "tests.json": json.dumps({"tests": tests, "setup": setup})},
            args=(str(write_fd), str(timeout_s)),
            pass_fds=(write_fd,),
        )
        os.close(write_fd)
        write_fd = -1
        lines = _drain(read_fd).decode("utf-8", errors="replace").splitlines()
    finally:
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)
    passed = [False] * len(tests)
    for line in lines:
        parts = line.split(" ")
        if len(parts) == 3 and parts[0] == nonce and parts[1].isdigit() and int(parts[1]) < len(tests):
            passed[int(parts[1])] = parts[2] == "PASS"
    return passed


def _drain(fd: int, limit: int = 1 << 20) -> bytes:
    """What is in the pipe now, without blocking: a program that escaped the group kill may still hold the write
    end open, and waiting for its EOF would hang the reward worker."""
    os.set_blocking(fd, False)
    chunks, size = [], 0
    while size < limit:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def outputs_match(actual: str, expected: str) -> bool:
    """Whitespace-insensitive comparison (token sequences), as most judges do."""
    return actual.split() == expected.split()


def run_io_tests(
    code: str, cases: list[tuple[str, str]], timeout_s: float = 2.0, total_timeout_s: float = 8.0,
    memory_mb: int = 1024,
) -> list[bool]:
    """Pass/fail per (stdin, expected stdout) case, one sandboxed run each; cases left when `total_timeout_s`
    is spent fail without running."""
    deadline = time.monotonic() + total_timeout_s
    passed = []
    for stdin, expected in cases:
        left = deadline - time.monotonic()
        if left <= 0.05:
            passed.append(False)
            continue
        result = run_python(code, stdin=stdin, timeout_s=min(timeout_s, left), memory_mb=memory_mb)
        passed.append(result.status == "ok" and outputs_match(result.stdout, expected))
    return passed


def _io_cases(reference: dict[str, Any]) -> list[tuple[str, str]]:
    if "io" in reference:
        return [(str(case["input"]), str(case["output"])) for case in reference["io"]]
    inputs, outputs = reference["inputs"], reference["outputs"]
    if len(inputs) != len(outputs):
        raise ValueError(f"code reference has {len(inputs)} inputs but {len(outputs)} outputs")
    return [(str(i), str(o)) for i, o in zip(inputs, outputs)]


@register_reward("code_tests", "fraction of reference tests (asserts or stdin/stdout pairs) the code passes, sandboxed")
def code_tests_reward(
    completion: str,
    reference: Any,
    test_timeout_s: float | None = None,
    total_timeout_s: float | None = None,
    memory_mb: int | None = None,
    **meta: Any,
) -> float:
    """Reference: `{"tests": ["assert f(1) == 2", ...], "setup": optional code run before them}` or
    `{"io": [{"input": ..., "output": ...}, ...]}` or `{"inputs": [...], "outputs": [...]}` (a bare list means
    assert tests). Limits from metadata or the reference: `test_timeout_s` (per test, default 2),
    `total_timeout_s` (default 8; keep the scorer's timeout above it), `memory_mb` (default 1024)."""
    if isinstance(reference, list):
        reference = {"tests": reference}
    if not isinstance(reference, dict) or not ({"tests", "io", "inputs"} & reference.keys()):
        raise ValueError(f"code_tests reference {reference!r:.80} has no 'tests', 'io' or 'inputs'")

    def limit(name: str, value: Any, default: float) -> float:
        return float(value if value is not None else reference.get(name, default))

    per_test = limit("test_timeout_s", test_timeout_s, 2.0)
    total = limit("total_timeout_s", total_timeout_s, 8.0)
    memory = int(limit("memory_mb", memory_mb, 1024))
    code = extract_code(completion)
    if not code.strip():
        raise InvalidAnswer("no code")
    try:
        compile(code, "solution.py", "exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise InvalidAnswer("code has a syntax error") from None
    if "tests" in reference:
        results = run_assert_tests(code, list(reference["tests"]), reference.get("setup", ""), per_test, total, memory)
    else:
        results = run_io_tests(code, _io_cases(reference), per_test, total, memory)
    if not results:
        raise ValueError("code_tests reference has no test cases")
    return sum(results) / len(results)
