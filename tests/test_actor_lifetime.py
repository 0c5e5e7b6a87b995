"""The job's Ray actors die with their driver, also when it is killed with -9 (the local Ray instance it started
would otherwise keep them, and their memory or GPUs, alive)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DRIVER = """
import ray, sys, time
from rollout.actors import ActorPool
pool = ActorPool("probe", "collections:OrderedDict", {}, num_workers=1)
print(ray.get(pool.actors[0].pid.remote()), flush=True)
time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purpose
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False


def test_actors_end_when_the_driver_is_killed():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0"}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        actor = int(driver.stdout.readline())
        assert alive(actor)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        deadline = time.time() + 30
        while alive(actor) and time.time() < deadline:
            time.sleep(0.5)
        assert not alive(actor), "the actor outlived its driver"
    finally:
        if driver.poll() is None:
            driver.kill()
