"""Cross-modal Multi-Teacher On-Policy Distillation: the distillation signal as an advantage estimator.

Importing this package registers the `mopd` estimator into `rl.algorithms`; the training loop is rl's.
"""

from mopd.estimator import mopd_advantage, reverse_kl_by_domain, topk_agreement

__all__ = ["mopd_advantage", "reverse_kl_by_domain", "topk_agreement"]
