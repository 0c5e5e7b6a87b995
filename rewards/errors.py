"""The two ways a reward can fail, kept apart on purpose.

`InvalidAnswer` is the model's fault (nothing parsable, wrong tool-call JSON): it is an expected training signal,
scored 0 and counted by reason. `RewardError` is the reward's fault (a bug, a NaN, a hang): it must be loud, so the
scorer raises it unless told to zero it.
"""

from __future__ import annotations


class InvalidAnswer(Exception):
    """Raised by a reward when the completion holds no usable answer. `reason` is short and categorical
    ("no interval found", "tool call is not valid JSON") because the scorer counts samples by it."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class RewardError(RuntimeError):
    """A reward function misbehaved. `errors` holds one message per failed sample; each names the reward
    function and the sample (id and a truncated completion)."""

    def __init__(self, message: str, errors: list[str] | None = None):
        super().__init__(message)
        self.errors = list(errors or [message])


class RewardSpecError(ValueError):
    """A reward spec (name, `module:function` or `file.py:function`) cannot be resolved; the message names the
    spec and what failed."""
