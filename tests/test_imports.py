"""Importing the trainer needs only what the job uses: no Ray for a torchrun or in-process job, no PyAV without
video, no `datasets` where no task source needs it (the GPU image has none of the three)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BLOCK = """
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'ray', 'av', 'datasets', 'trl', 'vllm'}:
            raise ModuleNotFoundError(f'No module named {name!r} (blocked by the test)')
sys.meta_path.insert(0, Blocker())
"""


def test_trainer_policy_and_cli_import_without_ray_pyav_datasets_trl_vllm(tmp_path):
    code = BLOCK + """
import rl.trainer, rl.policy, rl.worker_group, rl.placement, cli.main, models.policy_head, models.logprobs
from tasks.base import TASK_SOURCES
assert {'embedded', 'video_files'} <= set(TASK_SOURCES.names())  # known without importing them
try:
    TASK_SOURCES.get('embedded')
except ModuleNotFoundError as err:
    assert 'datasets' in str(err)
else:
    raise AssertionError('the embedded source should need datasets')
print('ok')
"""
    # from another folder: what is importable is what the installed package ships (pyproject's package list)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("ok")
