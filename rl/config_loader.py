"""YAML -> typed config: composition (`base:`), dotted overrides, validation with precise errors.

Every error names the file (or "command line"), the dotted key path and what was expected, and suggests the
closest valid key for a typo. The loader is generic over dataclasses; `rl.config` declares the job's fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A config problem, with where it is (file, key) and what was expected."""


COMMAND_LINE = "command line"
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def load_yaml_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> tuple[dict, dict[str, str]]:
    """Read a YAML file and its `base:` chain (paths relative to the file). Returns (merged dict, provenance:
    dotted key -> file that set it)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    resolved = path.resolve()
    if resolved in _seen:
        raise ConfigError(f"{path}: 'base' chain loops back to this file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    bases = data.pop("base", None) or []
    if isinstance(bases, str):
        bases = [bases]
    merged: dict = {}
    provenance: dict[str, str] = {}
    for base in bases:
        base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
        if not base_path.exists():
            raise ConfigError(f"{path}: key 'base': file {base} not found (looked at {base_path})")
        base_data, base_prov = load_yaml_tree(base_path, _seen + (resolved,))
        merged = deep_merge(merged, base_data)
        provenance.update(base_prov)
    merged = deep_merge(merged, data)
    provenance.update({key: str(path) for key in _dotted_keys(data)})
    return merged, provenance


def deep_merge(base: dict, override: dict) -> dict:
    """Mappings merge key by key; anything else (lists included) is replaced."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _dotted_keys(data: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(data, dict):
        for key, value in data.items():
            dotted = f"{prefix}{key}"
            keys.append(dotted)
            keys.extend(_dotted_keys(value, dotted + "."))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            keys.extend(_dotted_keys(value, f"{prefix}{i}."))
    return keys


def apply_overrides(data: dict, overrides: list[str], provenance: dict[str, str]) -> dict:
    """Apply `a.b.c=value` overrides (value parsed as YAML; list items addressed by index: `teachers.0.path=x`)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{COMMAND_LINE}: override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"{COMMAND_LINE}: override {item!r}: value is not valid YAML ({err})") from err
        parts = key.strip().split(".")
        node: Any = data
        for depth, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                node = node[_list_index(node, part, parts[: depth + 1])]
            else:
                if part not in node and parts[depth + 1].isdigit():
                    raise ConfigError(
                        f"{COMMAND_LINE}: override {item!r}: '{'.'.join(parts[: depth + 1])}' has no list to index"
                    )
                node = node.setdefault(part, {})
        last = parts[-1]
        if isinstance(node, list):
            node[_list_index(node, last, parts)] = value
        else:
            node[last] = value
        provenance[key.strip()] = COMMAND_LINE
    return data


def _list_index(node: list, part: str, path: list[str]) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"{COMMAND_LINE}: key '{'.'.join(path)}': '{part}' is not an index of a list of {len(node)}")
    return int(part)


def build_dataclass(cls: type, data: Any, provenance: dict[str, str], prefix: str = "") -> Any:
    """Validate `data` into dataclass `cls` recursively; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(_where(provenance, prefix.rstrip(".")) + f"expected a mapping for {cls.__name__}, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(_where(provenance, f"{prefix}{key}") + f"unknown key '{prefix}{key}'{hint}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, provenance, f"{prefix}{name}")
        _check_bounds(fields[name], kwargs[name], provenance, f"{prefix}{name}")
    for name, f in fields.items():
        if "options" in f.metadata:  # a backend's typed option section, checked against the chosen backend
            kwargs[name] = _backend_options(f, fields, kwargs, data, provenance, prefix)
    try:
        obj = cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise ConfigError(_where(provenance, prefix.rstrip(".")) + f"{cls.__name__}: {err}") from err
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as err:
            raise ConfigError(_where(provenance, prefix.rstrip(".")) + str(err)) from err
    return obj


def _check_bounds(f: dataclasses.Field, value: Any, provenance: dict[str, str], key: str) -> None:
    """The field's declared bounds (`ge`, `gt`, `le`; each item of a list) and registered `choices`."""
    meta = f.metadata
    choices = meta.get("choices")
    if choices is not None and value is not None:
        names = choices()
        if value not in names:
            close = difflib.get_close_matches(str(value), names, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(_where(provenance, key) + f"key '{key}': {value!r} is not registered "
                              f"(registered: {', '.join(names)}){hint}")
    values = value if isinstance(value, list) else [value]
    for item in values:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            continue
        for bound, ok, word in (("ge", lambda a, b: a >= b, ">="), ("gt", lambda a, b: a > b, ">"),
                                ("le", lambda a, b: a <= b, "<=")):
            if bound in meta and not ok(item, meta[bound]):
                raise ConfigError(_where(provenance, key) + f"key '{key}': must be {word} {meta[bound]:g}, got {item!r}")


def _backend_options(f: dataclasses.Field, fields: dict, kwargs: dict, data: dict, provenance: dict[str, str],
                     prefix: str) -> Any:
    """Validate a backend's option mapping against its typed section and return it complete (every key, the
    section's defaults filled in), so that what the engine receives is what `config.yaml` records."""
    sibling = f.metadata["options_of"]
    backend = kwargs.get(sibling, fields[sibling].default)
    section = f.metadata["options"](backend)
    value = kwargs.get(f.name, {})
    if section is None:  # a backend registered without an option class: any mapping
        return value
    key = f"{prefix}{f.name}"
    if f.name not in data:
        provenance.setdefault(key, _where(provenance, prefix.rstrip(".")).rstrip(": "))
    try:
        return to_dict(build_dataclass(section, value, provenance, key + "."))
    except ConfigError as err:
        raise ConfigError(f"{err} ({sibling} {backend!r})") from None


def _coerce(hint: Any, value: Any, provenance: dict[str, str], key: str) -> Any:
    origin = get_origin(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, provenance, key)
            except ConfigError as err:
                errors.append(err)
        raise errors[-1] if len(errors) == 1 else ConfigError(
            _where(provenance, key) + f"key '{key}': expected {_type_name(hint)}, got {value!r}"
        )
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, provenance, key + ".")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(_where(provenance, key) + f"key '{key}': expected a list, got {value!r}")
        (item,) = get_args(hint) or (Any,)
        return [_coerce(item, v, provenance, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(_where(provenance, key) + f"key '{key}': expected a mapping, got {value!r}")
        _, item = get_args(hint) or (str, Any)
        return {k: _coerce(item, v, provenance, f"{key}.{k}") for k, v in value.items()}
    if origin is typing.Literal:
        if value not in get_args(hint):
            choices = ", ".join(repr(c) for c in get_args(hint))
            raise ConfigError(_where(provenance, key) + f"key '{key}': expected one of {choices}, got {value!r}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads "3e-4" (no dot) as a string
    if hint in (int, float, str, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise ConfigError(
                _where(provenance, key) + f"key '{key}': expected {hint.__name__}, got {type(value).__name__} {value!r}"
            )
        return value
    return value


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _where(provenance: dict[str, str], key: str) -> str:
    """The file that set `key` (or its nearest parent), as an error prefix."""
    probe = key
    while probe:
        if probe in provenance:
            return f"{provenance[probe]}: "
        probe = probe.rpartition(".")[0]
    return f"{provenance.get('', 'config')}: "


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain data (for writing the resolved config)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def describe_fields(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every field, from the `help` metadata: the README's key reference.

    Items of a list of sections appear as `teachers[].name`; a backend's typed option section as one row per
    key and backend, `rollout.engine_args.dtype (hf)`."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        item = _list_item_section(hint)
        if dataclasses.is_dataclass(hint):
            rows.extend(describe_fields(hint, f"{prefix}{f.name}."))
            continue
        if item is not None:
            rows.append((f"{prefix}{f.name}", _default_repr(f), f.metadata.get("help", "")))
            rows.extend(describe_fields(item, f"{prefix}{f.name}[]."))
            continue
        rows.append((f"{prefix}{f.name}", _default_repr(f), f.metadata.get("help", "")))
        if "options" in f.metadata:
            rows.extend(_option_rows(f, cls, f"{prefix}{f.name}"))
    return rows


def _list_item_section(hint: Any) -> type | None:
    if get_origin(hint) is list:
        (item,) = get_args(hint) or (Any,)
        if dataclasses.is_dataclass(item):
            return item
    return None


def _default_repr(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(f.default_factory())  # type: ignore[misc]
    return "(required)"


def _option_rows(f: dataclasses.Field, owner: type, key: str) -> list[tuple[str, str, str]]:
    """One row per key of each registered backend's option section."""
    sibling = next(s for s in dataclasses.fields(owner) if s.name == f.metadata["options_of"])
    rows = []
    for backend in sibling.metadata["choices"]():
        section = f.metadata["options"](backend)
        if section is None:
            continue
        for sub, default, help_text in describe_fields(section):
            rows.append((f"{key}.{sub} ({backend})", default, help_text))
    return rows
