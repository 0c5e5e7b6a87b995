"""Entry point of one reward worker process: `python -m rewards.worker READ_FD WRITE_FD`.

Started by `rewards.pool.WorkerPool` as a plain subprocess (not a multiprocessing fork), so it never re-imports
the trainer's main module or torch; it loads rewards from their specs itself, which is what lets user functions
from files (not picklable by reference) run here.

Protocol (pickled messages over two pipes): first `{"sys_path", "preload", "base_dir"}`; then jobs
`(job_id, key, spec, items)` with items `[(prompt, completion, reference, meta, extras), ...]` (extras:
`rewards.inputs`), or None to stop. Replies:
`("plan", job_id, unit_sizes)` once the reward is loaded, then one `("done", job_id, outcomes)` per unit (a unit is
one sample, or the whole job for batched rewards), or `("fatal", job_id, message)` when the spec does not load.
"""

from __future__ import annotations

import importlib
import sys
from multiprocessing.connection import Connection
from typing import Any

from rewards.registry import BatchReward, Outcome, call_units, describe_exception, get_reward


def serve(inbox: Connection, outbox: Connection) -> None:
    init: dict[str, Any] = inbox.recv()
    sys.path[:] = list(dict.fromkeys(init["sys_path"] + sys.path))
    for module in init.get("preload", ()):
        importlib.import_module(module)
    cache: dict[str, BatchReward] = {}
    while True:
        try:
            message = inbox.recv()
        except EOFError:
            return
        if message is None:
            return
        job_id, key, spec, items = message
        reward = cache.get(key)
        if reward is None:
            try:
                reward = cache[key] = get_reward(spec, base_dir=init.get("base_dir"))
            except BaseException as exc:  # noqa: BLE001 - reported to the parent, which names the samples
                outbox.send(("fatal", job_id, f"loading reward {spec!r:.100} failed: {describe_exception(exc)}"))
                continue
        prompts, completions, references, metas, extras = (list(column) for column in zip(*items))
        units = call_units(reward, len(items))
        outbox.send(("plan", job_id, [end - start for start, end in units]))
        for start, end in units:
            try:
                outcomes = reward.outcomes(
                    prompts[start:end], completions[start:end], references[start:end], metas[start:end],
                    extras[start:end],
                )
            except Exception as exc:  # noqa: BLE001
                outcomes = [Outcome(0.0, (), describe_exception(exc))] * (end - start)
            outbox.send(("done", job_id, [tuple(o) for o in outcomes]))


def main() -> None:
    read_fd, write_fd = int(sys.argv[1]), int(sys.argv[2])
    serve(Connection(read_fd, writable=False), Connection(write_fd, readable=False))


if __name__ == "__main__":
    main()
