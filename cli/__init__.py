"""Command line: `vlpost train|eval|check|score|rewards|demo|keys` (also `python -m cli`)."""
