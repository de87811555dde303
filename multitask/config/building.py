"""Building config dataclasses from plain data, every value checked against its field's type hint, and back.

A mistake becomes a one-line ConfigError that says where to look (file and line, or the ``--set`` override at
fault), which key, and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from multitask.config.reading import LineMap, join_path, show
from multitask.errors import ConfigError

T = TypeVar("T")

_SCALARS = (str, int, float, bool, Path)


@dataclasses.dataclass(frozen=True)
class _Where:
    """Turns a key path into the place a user should look: the override that set it, or file:line."""

    source: str
    lines: Mapping[str, int]
    origins: Mapping[str, str]

    def locate(self, path: str) -> str:
        # An override replaces everything under its path, so it wins over (stale) file lines.
        for prefix in _prefixes(path):
            if prefix in self.origins:
                return self.origins[prefix]
        for prefix in _prefixes(path):
            if prefix in self.lines:
                return f"{self.source}:{self.lines[prefix]}"
        return self.source

    def error(self, path: str, message: str) -> ConfigError:
        key = f" key {path!r}:" if path else ""  # repr: a key may hold a newline
        return ConfigError(f"{self.locate(path)}:{key} {message}")


def from_dict(
    cls: type[T],
    data: Any,
    *,
    source: str = "<dict>",
    lines: LineMap | None = None,
    path: str = "",
    origins: Mapping[str, str] | None = None,
) -> T:
    """Build dataclass ``cls`` from plain data, checking every value against the field's type hint.

    ``source`` and ``lines`` (from ``load_yaml``) locate errors; ``path`` is the key path of
    ``data`` inside a larger document; ``origins`` maps key paths set by overrides to the label to
    report instead of ``source:line`` (``load_config`` fills it in).
    """
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    return _build(cls, data, path, _Where(source, lines or {}, origins or {}))


def _build(cls: type[T], value: Any, path: str, where: _Where) -> T:
    """Construct one dataclass: no unknown keys, all required keys, then its own __post_init__ checks."""
    if not isinstance(value, Mapping):
        raise where.error(path, f"expected a mapping for {cls.__name__}, got {show(value)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in value:
        if key not in fields:
            raise where.error(join_path(path, str(key)), _unknown_key(key, list(fields)))
    hints = field_types(cls)
    kwargs = {}
    for name, field in fields.items():
        child = join_path(path, name)
        if name in value:
            kwargs[name] = _convert(hints[name], value[name], child, where)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise where.error(child, f"required key is missing (expected {type_name(hints[name])})")
    try:
        return cls(**kwargs)
    except ValueError as exc:  # cross-field checks in __post_init__
        raise where.error(path, str(exc)) from exc


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Resolved field types; get_type_hints also resolves ``from __future__ import annotations`` strings."""
    return get_type_hints(cls)


def _convert(tp: Any, value: Any, path: str, where: _Where) -> Any:
    """Check ``value`` against type hint ``tp``; return it converted (dataclasses built, Paths made)."""
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, where)
    origin = get_origin(tp) or tp
    if origin is Literal:
        return _literal(tp, value, path, where)
    if origin in (Union, types.UnionType):
        return _union(tp, value, path, where)
    if origin in (list, tuple):
        return _sequence(tp, value, path, where)
    if origin is dict:
        return _mapping(tp, value, path, where)
    if tp in _SCALARS:
        return _scalar(tp, value, path, where)
    raise TypeError(f"unsupported config field type {tp!r} at key '{path}'")


def _scalar(tp: type, value: Any, path: str, where: _Where) -> Any:
    # bool is a subclass of int, so True must not pass as an int (or a float).
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is Path and isinstance(value, (str, Path)):
        return Path(value)
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise where.error(path, f"expected {type_name(tp)}, got {show(value)}")


def _literal(tp: Any, value: Any, path: str, where: _Where) -> Any:
    allowed = get_args(tp)
    # Compare types too: 1 == True, yet Literal[1] should not accept true.
    if any(value == choice and type(value) is type(choice) for choice in allowed):
        return value
    hint = _did_you_mean(value, [choice for choice in allowed if isinstance(choice, str)])
    raise where.error(path, f"expected {type_name(tp)}, got {show(value)}{hint}")


def _union(tp: Any, value: Any, path: str, where: _Where) -> Any:
    """Try the union's types in order; with a single non-null type, keep that type's precise error."""
    arms = get_args(tp)
    if value is None and type(None) in arms:
        return None
    candidates = [arm for arm in arms if arm is not type(None)]
    if len(candidates) == 1:
        return _convert(candidates[0], value, path, where)
    for arm in candidates:
        try:
            return _convert(arm, value, path, where)
        except ConfigError:
            continue
    raise where.error(path, f"expected {type_name(tp)}, got {show(value)}")


def _sequence(tp: Any, value: Any, path: str, where: _Where) -> list | tuple:
    """list[X], tuple[X, ...] and fixed tuple[X, Y]; YAML has only lists, so both accept a list."""
    origin, args = get_origin(tp) or tp, get_args(tp)
    if not isinstance(value, (list, tuple)):
        raise where.error(path, f"expected {type_name(tp)}, got {show(value)}")
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise where.error(path, f"expected {type_name(tp)} ({len(args)} items), got {show(value)}")
        item_types = list(args)
    else:
        item_types = [args[0] if args else Any] * len(value)
    items = [
        _convert(item_type, item, join_path(path, str(index)), where)
        for index, (item_type, item) in enumerate(zip(item_types, value))
    ]
    return tuple(items) if origin is tuple else items


def _mapping(tp: Any, value: Any, path: str, where: _Where) -> dict:
    if not isinstance(value, Mapping):
        raise where.error(path, f"expected {type_name(tp)}, got {show(value)}")
    key_type, value_type = get_args(tp) or (Any, Any)
    result = {}
    for key, item in value.items():
        child = join_path(path, str(key))
        result[_convert(key_type, key, child, where)] = _convert(value_type, item, child, where)
    return result


def _unknown_key(key: Any, allowed: list[str]) -> str:
    return f"unknown key{_did_you_mean(key, allowed)}; allowed keys: {', '.join(allowed)}"


def _did_you_mean(word: Any, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1) if isinstance(word, str) else []
    return f" (did you mean {close[0]!r}?)" if close else ""


def type_name(tp: Any) -> str:
    """A short, readable name for a type hint, for error messages and ``describe``."""
    if tp is Any:
        return "any"
    if tp is type(None):
        return "null"
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(choice) for choice in args)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(arm) for arm in args)
    if origin in (list, tuple, dict):
        inner = ", ".join("..." if arg is Ellipsis else type_name(arg) for arg in args)
        return f"{origin.__name__}[{inner}]"
    return getattr(tp, "__name__", repr(tp))


def _prefixes(path: str) -> list[str]:
    """``a.b.c`` -> ``[a.b.c, a.b, a]``: the path and its ancestors, nearest first."""
    parts = path.split(".") if path else []
    return [".".join(parts[:end]) for end in range(len(parts), 0, -1)]


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain dict of a config dataclass (Paths as str, tuples as lists), ready for JSON or YAML.

    Only init fields are written, so ``from_dict(type(obj), to_dict(obj)) == obj``.
    """
    if not (dataclasses.is_dataclass(obj) and not isinstance(obj, type)):
        raise TypeError(f"to_dict needs a dataclass instance, got {obj!r}")
    return plain(obj)


def plain(value: Any) -> Any:
    """A config value as plain data: dataclasses as dicts of their init fields, tuples as lists, Paths as str."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, Mapping):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value
