"""The project's Triton kernel modules, imported once on first use, or None where Triton does not import (a CPU
install): callers then take their torch-op path. Cached so that the import is tried once, not on every call."""

from __future__ import annotations

import functools
import importlib
from types import ModuleType


@functools.cache
def kernels_module(name: str) -> ModuleType | None:
    """`models.<name>` (a module that imports triton at its top), or None where that import fails."""
    try:
        return importlib.import_module(f"models.{name}")
    except ImportError:
        return None
