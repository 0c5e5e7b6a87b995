"""Declaring a config option: its help text and bounds live on the field, where the option is declared.

`option(help, default=..., ge=0)` is a dataclass field whose metadata the config loader (`rl.config_loader`)
enforces (bounds, registered choices) and `vlpost keys` prints. Kept here, beside no project imports, so that
engine and backend option classes in `rollout/` and `teachers/` declare their keys the same way as `rl.config`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

_MISSING: Any = dataclasses.MISSING


def option(
    help: str,  # noqa: A002 - the word users read in `vlpost keys`
    *,
    default: Any = _MISSING,
    default_factory: Any = _MISSING,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    choices: Callable[[], list[str]] | None = None,
    options: Callable[[Any], type | None] | None = None,
    options_of: str | None = None,
) -> Any:
    """A documented field. `ge` / `gt` / `le`: numeric bounds (a list's items are bounded one by one).
    `choices`: the valid values, asked for at load time (a registry's `names`). `options` / `options_of`: this
    mapping is the typed option section of the backend named by sibling field `options_of`; `options(name)` is
    that backend's option dataclass (None: the backend declares none, any mapping passes)."""
    meta: dict[str, Any] = {"help": help}
    for key, value in (("ge", ge), ("gt", gt), ("le", le), ("choices", choices), ("options", options),
                       ("options_of", options_of)):
        if value is not None:
            meta[key] = value
    kwargs: dict[str, Any] = {"metadata": meta}
    if default is not _MISSING:
        kwargs["default"] = default
    if default_factory is not _MISSING:
        kwargs["default_factory"] = default_factory
    return dataclasses.field(**kwargs)
