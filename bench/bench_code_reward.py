"""Throughput of the `code_tests` reward through RewardScorer and its sandbox, at 1 and 2 workers.

The batch mixes passing, failing, crashing and hanging programs (a hanging one costs its per-test time limit),
like a real batch of model-written code. A hanging program costs 1 time limit per test it hangs in (each test
runs under its own limit), so the 1-in-16 hangers dominate the wall time. Worker start-up is timed separately.

    python bench/bench_code_reward.py [--samples 64] [--workers 1 2] [--test-timeout 1.0]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rewards import RewardScorer

TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(10, 5) == 15"]
PROGRAMS = {
    "pass": "def add(a, b):\n    return a + b",
    "fail": "def add(a, b):\n    return a + b if a >= 0 else 99",  # passes 2 of 3
    "crash": "def add(a, b):\n    raise RuntimeError('oops')",
    "hang": "def add(a, b):\n    while True:\n        pass",
}
# per 16 samples: 10 pass, 3 fail, 2 crash, 1 hang
MIX = ["pass"] * 10 + ["fail"] * 3 + ["crash"] * 2 + ["hang"]
EXPECTED = {"pass": 1.0, "fail": 2 / 3, "crash": 0.0, "hang": 0.0}


def make_batch(n: int, test_timeout_s: float) -> list[dict]:
    batch = []
    for i in range(n):
        kind = MIX[i % len(MIX)]
        batch.append({
            "id": f"{kind}-{i}",
            "domain": "code",
            "prompt": "Write add(a, b).",
            "completion": f"```python\n{PROGRAMS[kind]}\n```",
            "reference": {"tests": TESTS},
            "metadata": {"test_timeout_s": test_timeout_s, "kind": kind},
        })
    return batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--test-timeout", type=float, default=1.0)
    args = parser.parse_args()
    batch = make_batch(args.samples, args.test_timeout)
    kinds = [s["metadata"]["kind"] for s in batch]
    counts = {k: kinds.count(k) for k in PROGRAMS}
    print(f"code_tests: {args.samples} programs ({', '.join(f'{v} {k}' for k, v in counts.items())}), "
          f"{len(TESTS)} asserts each, per-test limit {args.test_timeout:g}s")
    header = f"| {'workers':>7} | {'startup s':>9} | {'batch s':>7} | {'samples/s':>9} | {'mean reward':>11} | {'correct':>7} |"
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    for workers in args.workers:
        with RewardScorer({"code": "code_tests"}, num_workers=workers, timeout_s=30) as scorer:
            start = time.perf_counter()
            scorer.score(batch[:1])  # start the pool
            startup = time.perf_counter() - start
            start = time.perf_counter()
            result = scorer.score(batch)
            elapsed = time.perf_counter() - start
        correct = sum(abs(r - EXPECTED[k]) < 1e-9 for r, k in zip(result.rewards, kinds))
        print(f"| {workers:>7} | {startup:>9.2f} | {elapsed:>7.2f} | {len(batch) / elapsed:>9.1f} | "
              f"{result.rewards.mean():>11.3f} | {correct:>3}/{len(batch):<3} |")


if __name__ == "__main__":
    main()
