"""`vlpost compare`: MOPD against the methods a team would otherwise use (Mix-RL, Cascade RL, off-policy
fine-tuning, parameter merging), from one base student, under one update budget (docs/compare.md)."""
