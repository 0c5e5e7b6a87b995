"""The one name -> object registry behind every pluggable part: algorithms, engines, teacher backends, task
sources, rewards.

Why one class: registries used to behave four ways (silent overwrite, raise, a dict in the trainer, a `Literal`
in the config). Here a taken name is refused unless the same object is registered again (a module imported
twice), lookups name the closest registered name, and the config loader asks `names()` for a key's choices, so
a backend registered by a user is accepted like a built-in one.

Entries may be *lazy*: `"module:attr"` strings imported on first lookup, so an optional dependency (vLLM) is
only needed by the configs that use it, while its name is known (and validated) everywhere.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """An unknown name; `str()` is the message itself (not KeyError's repr of it)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def import_target(target: str) -> Any:
    """`"package.module:attr"` -> the attribute."""
    module, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split(".") if attr else ():
        obj = getattr(obj, part)
    return obj


class Registry(Generic[T]):
    """Names of one kind of plug-in (`kind` appears in messages: "rollout backend", "policy loss", ...).

    `register(name)` is a decorator; `register(name, obj)` registers directly; `register(name, "mod:attr")`
    registers lazily. `info` is free per-entry metadata (e.g. the typed options class of an engine), readable
    without importing a lazy entry.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Any] = {}
        self._info: dict[str, dict[str, Any]] = {}

    def register(self, name: str, obj: T | str | None = None, **info: Any) -> Any:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if obj is None:
            def wrap(target: T) -> T:
                self._put(name, target, info)
                return target

            return wrap
        self._put(name, obj, info)
        return obj

    def _put(self, name: str, obj: Any, info: dict[str, Any]) -> None:
        taken = self._entries.get(name)
        if taken is not None and not _same(taken, obj):
            raise ValueError(f"{self.kind} {name!r} is already registered ({_describe(taken)}); "
                             f"refusing to replace it with {_describe(obj)}: pick another name")
        if taken is None or isinstance(taken, str):
            self._entries[name] = obj
        if info:
            self._info[name] = {**self._info.get(name, {}), **info}

    def get(self, name: str) -> T:
        """The object registered as `name` (a lazy entry is imported now); RegistryError names the choices."""
        if name not in self._entries:
            raise RegistryError(self.unknown(name))
        obj = self._entries[name]
        if isinstance(obj, str):
            obj = import_target(obj)
            self._entries[name] = obj
        return obj

    def target(self, name: str) -> str:
        """"module:attr" of entry `name`, without importing a lazy one (what an actor in another process builds)."""
        if name not in self._entries:
            raise RegistryError(self.unknown(name))
        entry = self._entries[name]
        return entry if isinstance(entry, str) else f"{entry.__module__}:{entry.__qualname__}"

    def info(self, name: str) -> dict[str, Any]:
        return dict(self._info.get(name, {}))

    def unknown(self, name: Any) -> str:
        """The message for an unknown `name`: the closest registered name, or all of them."""
        names = self.names()
        close = difflib.get_close_matches(str(name), names, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.kind} {name!r}; registered: {', '.join(names) or '(none)'}{hint}"

    def copy(self) -> Registry[T]:
        """An independent registry with the same entries (tests register into a copy)."""
        other: Registry[T] = Registry(self.kind)
        other._entries, other._info = dict(self._entries), {k: dict(v) for k, v in self._info.items()}
        return other

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)


def _same(a: Any, b: Any) -> bool:
    """Same object, or a lazy entry and the object it names (a lazy name resolving to its own registration)."""
    if a is b or a == b:
        return True
    named = all(hasattr(x, "__qualname__") and hasattr(x, "__module__") for x in (a, b))
    if named and not isinstance(a, str) and not isinstance(b, str):  # the same definition, imported again
        return _describe(a) == _describe(b) and "<lambda>" not in _describe(a)
    for lazy, obj in ((a, b), (b, a)):
        if isinstance(lazy, str) and not isinstance(obj, str):
            module, _, attr = lazy.partition(":")
            if getattr(obj, "__module__", None) == module and getattr(obj, "__qualname__", None) == attr:
                return True
    return False


def _describe(obj: Any) -> str:
    if isinstance(obj, str):
        return obj
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"

