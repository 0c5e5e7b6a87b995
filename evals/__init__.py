"""Held-out evaluation: benchmark adapters (task sources), their official scorers, watch mode and the retention view.

Importing the package registers the task sources `qvhighlights`, `charades_sta`, `bfcl` and `niah`.
Scoring entry points live in `evals.score` (`score`, `score_generations`, `format_table`, `main`).
"""

from evals import bfcl, charades, niah, qvhighlights  # noqa: F401  (register task sources)
from evals.io import PredictionsError

__all__ = ["PredictionsError", "bfcl", "charades", "niah", "qvhighlights"]
