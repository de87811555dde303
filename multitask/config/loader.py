"""Typed, strict configuration: YAML (or a dict) -> validated dataclasses.

Every mistake becomes a one-line ConfigError that says where to look (file and line, or the
``--set`` override at fault), which key, and what was expected, so a user can fix a config
without reading a traceback.

Scalars in YAML files and in ``--set`` values resolve in the spirit of YAML 1.2: ``1e-3`` is a
float (PyYAML alone reads it as a string), only ``true``/``false`` are booleans (``yes``, ``no``,
``on``, ``off`` stay strings, so ``fp16: yes`` is reported rather than guessed), and dates stay
strings (a run named ``2024-01-01`` is not turned into a ``datetime.date``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import inspect
import json
import re
import types
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from multitask.errors import ConfigError

LineMap = dict[str, int]
"""Dotted key path (``tasks.0.batch_size``) -> 1-based line of that key or list item in the file."""

T = TypeVar("T")

_BOOL_TAG = "tag:yaml.org,2002:bool"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_SCALARS = (str, int, float, bool, Path)
_MAX_SHOWN = 60


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2-like implicit scalars (see the module docstring for why)."""


_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_BOOL_TAG, _TIMESTAMP_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_StrictLoader.add_implicit_resolver(  # exponent floats PyYAML misses: 1e-3, 5E4, 1.0e5, .5e-2
    _FLOAT_TAG,
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


# --------------------------------------------------------------------------- reading YAML


def load_yaml(path: str | Path) -> tuple[Any, LineMap]:
    """Parse a YAML file safely and return its data with the line of every key path.

    The line map is what lets later type errors, found long after parsing, still point at a line.
    Duplicate keys are rejected, because PyYAML would silently keep the last one.
    """
    source = str(path)
    text = _read(path, source)
    loader = None
    try:
        loader = _StrictLoader(text)  # rejects control characters (NUL...) here, before parsing
        node = loader.get_single_node()
        lines: LineMap = {}
        if node is not None:
            _record_lines(node, "", source, lines, set())
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        line, problem = _yaml_problem(exc)
        if isinstance(exc, yaml.reader.ReaderError):
            line = text.count("\n", 0, exc.position) + 1
        where = f"{source}:{line}" if line else source
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{source}: invalid YAML: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()
    if not isinstance(data, dict):
        where = f"{source}:{node.start_mark.line + 1}" if node is not None else source
        raise ConfigError(f"{where}: expected a mapping of keys at the top level, got {_show(data)}")
    return data, lines


def _read(path: str | Path, source: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise ConfigError(f"{source}: cannot read the file: {reason}") from None


def _yaml_problem(exc: yaml.YAMLError) -> tuple[int | None, str]:
    """The 1-based line (when PyYAML knows it) and a one-line description of a YAML error."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "syntax error"
        return (mark.line + 1 if mark else None), " ".join(problem.split())
    if isinstance(exc, yaml.reader.ReaderError) and isinstance(exc.character, int):
        return None, f"unacceptable character #x{exc.character:04x}: {exc.reason}"
    return None, " ".join(str(exc).split())


def _record_lines(node: yaml.Node, path: str, source: str, lines: LineMap, seen: set[int]) -> None:
    """Fill ``lines`` for every key and list item under ``node``, rejecting duplicate keys.

    Keys pulled in through a ``<<`` merge get no entry; errors on them fall back to the line of
    the mapping that merged them (see ``_Where.locate``). Likewise for keys under a repeated
    ``*alias``: each node is walked once (``seen``), so recursive or nested aliases cannot recurse
    forever or blow up exponentially.
    """
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first_seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key, line = str(key_node.value), key_node.start_mark.line + 1
            child = _join(path, key)
            if key in first_seen:
                raise ConfigError(
                    f"{source}:{line}: key {child!r}: duplicate key (first set on line {first_seen[key]})"
                )
            first_seen[key] = lines[child] = line
            _record_lines(value_node, child, source, lines, seen)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = _join(path, str(index))
            lines[child] = item.start_mark.line + 1
            _record_lines(item, child, source, lines, seen)


# --------------------------------------------------------------------------- building dataclasses


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
        raise where.error(path, f"expected a mapping for {cls.__name__}, got {_show(value)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in value:
        if key not in fields:
            raise where.error(_join(path, str(key)), _unknown_key(key, list(fields)))
    hints = _hints(cls)
    kwargs = {}
    for name, field in fields.items():
        child = _join(path, name)
        if name in value:
            kwargs[name] = _convert(hints[name], value[name], child, where)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise where.error(child, f"required key is missing (expected {_type_name(hints[name])})")
    try:
        return cls(**kwargs)
    except ValueError as exc:  # cross-field checks in __post_init__
        raise where.error(path, str(exc)) from exc


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
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
    raise where.error(path, f"expected {_type_name(tp)}, got {_show(value)}")


def _literal(tp: Any, value: Any, path: str, where: _Where) -> Any:
    allowed = get_args(tp)
    # Compare types too: 1 == True, yet Literal[1] should not accept true.
    if any(value == choice and type(value) is type(choice) for choice in allowed):
        return value
    hint = _did_you_mean(value, [choice for choice in allowed if isinstance(choice, str)])
    raise where.error(path, f"expected {_type_name(tp)}, got {_show(value)}{hint}")


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
    raise where.error(path, f"expected {_type_name(tp)}, got {_show(value)}")


def _sequence(tp: Any, value: Any, path: str, where: _Where) -> list | tuple:
    """list[X], tuple[X, ...] and fixed tuple[X, Y]; YAML has only lists, so both accept a list."""
    origin, args = get_origin(tp) or tp, get_args(tp)
    if not isinstance(value, (list, tuple)):
        raise where.error(path, f"expected {_type_name(tp)}, got {_show(value)}")
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise where.error(path, f"expected {_type_name(tp)} ({len(args)} items), got {_show(value)}")
        item_types = list(args)
    else:
        item_types = [args[0] if args else Any] * len(value)
    items = [
        _convert(item_type, item, _join(path, str(index)), where)
        for index, (item_type, item) in enumerate(zip(item_types, value))
    ]
    return tuple(items) if origin is tuple else items


def _mapping(tp: Any, value: Any, path: str, where: _Where) -> dict:
    if not isinstance(value, Mapping):
        raise where.error(path, f"expected {_type_name(tp)}, got {_show(value)}")
    key_type, value_type = get_args(tp) or (Any, Any)
    result = {}
    for key, item in value.items():
        child = _join(path, str(key))
        result[_convert(key_type, key, child, where)] = _convert(value_type, item, child, where)
    return result


def _unknown_key(key: Any, allowed: list[str]) -> str:
    return f"unknown key{_did_you_mean(key, allowed)}; allowed keys: {', '.join(allowed)}"


def _did_you_mean(word: Any, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1) if isinstance(word, str) else []
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type_name(tp: Any) -> str:
    """A short, readable name for a type hint, for error messages and ``describe``."""
    if tp is Any:
        return "any"
    if tp is type(None):
        return "null"
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(choice) for choice in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(arm) for arm in args)
    if origin in (list, tuple, dict):
        inner = ", ".join("..." if arg is Ellipsis else _type_name(arg) for arg in args)
        return f"{origin.__name__}[{inner}]"
    return getattr(tp, "__name__", repr(tp))


def _show(value: Any) -> str:
    """repr() cut short, so one huge value cannot turn an error into a wall of text."""
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _prefixes(path: str) -> list[str]:
    """``a.b.c`` -> ``[a.b.c, a.b, a]``: the path and its ancestors, nearest first."""
    parts = path.split(".") if path else []
    return [".".join(parts[:end]) for end in range(len(parts), 0, -1)]


# --------------------------------------------------------------------------- back to plain data


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain dict of a config dataclass (Paths as str, tuples as lists), ready for JSON or YAML.

    Only init fields are written, so ``from_dict(type(obj), to_dict(obj)) == obj``.
    """
    if not (dataclasses.is_dataclass(obj) and not isinstance(obj, type)):
        raise TypeError(f"to_dict needs a dataclass instance, got {obj!r}")
    return _plain(obj)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value


# --------------------------------------------------------------------------- overrides


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str], source: str = "--set") -> dict:
    """Return a copy of ``data`` with each ``key.path=value`` override applied, in order.

    Values are parsed as YAML (``3``, ``1e-3``, ``true``, ``null``, ``[a, b]``); an empty value is
    null, so write ``key=''`` for an empty string. Missing (or null) intermediate keys become
    mappings; a numeric key indexes an existing list item. Types are checked later by ``from_dict``.
    """
    return _apply_overrides(data, overrides, source)[0]


def _apply_overrides(
    data: Mapping[str, Any], overrides: Iterable[str], source: str
) -> tuple[dict, dict[str, str]]:
    """Apply overrides and also return, per overridden key path, the label errors should name."""
    result, origins = copy.deepcopy(dict(data)), {}
    for item in overrides:
        label = f"{source} {item!r}"
        keys, value = _parse_override(item, label)
        _assign(result, keys, value, label)
        origins[".".join(keys)] = label
    return result, origins


def _parse_override(item: str, label: str) -> tuple[list[str], Any]:
    key, sep, text = item.partition("=")
    keys = key.strip().split(".")
    if not sep or not all(keys):
        raise ConfigError(f"{label}: expected key.path=value")
    try:
        return keys, yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{label}: invalid YAML value: {_yaml_problem(exc)[1]}") from None


def _assign(data: dict, keys: list[str], value: Any, label: str) -> None:
    """``data[k1][k2]...[kn] = value``, creating missing mappings on the way."""
    node: Any = data
    for depth, key in enumerate(keys[:-1]):
        slot = _slot(node, key, ".".join(keys[:depth]), label)
        child = node.get(slot) if isinstance(node, dict) else node[slot]
        if child is None:
            child = node[slot] = {}
        elif not isinstance(child, (dict, list)):
            raise ConfigError(
                f"{label}: cannot set a key inside '{'.'.join(keys[: depth + 1])}', which holds {_show(child)}"
            )
        node = child
    node[_slot(node, keys[-1], ".".join(keys[:-1]), label)] = value


def _slot(container: dict | list, key: str, path: str, label: str) -> str | int:
    """The dict key, or the list index, that ``key`` names; a list index must already exist."""
    if isinstance(container, dict):
        return key
    if key.isdigit() and int(key) < len(container):
        return int(key)
    raise ConfigError(f"{label}: '{path}' is a list of {len(container)} items; {key!r} is not an index in it")


# --------------------------------------------------------------------------- convenience and docs


def load_config(cls: type[T], path: str | Path, overrides: Iterable[str] = ()) -> T:
    """Load a YAML file, apply ``--set`` overrides and build ``cls``; errors name the file or the override."""
    data, lines = load_yaml(path)
    data, origins = _apply_overrides(data, overrides, "--set")
    return from_dict(cls, data, source=str(path), lines=lines, origins=origins)


def describe(cls: type) -> str:
    """Markdown reference for ``cls`` and each dataclass nested in it: one table of keys per class.

    Generated from the dataclasses themselves (types, defaults, ``field(metadata={"help": ...})``),
    so the README's config reference cannot drift from the code.
    """
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"describe needs a dataclass type, got {cls!r}")
    return "\n\n".join(_describe_one(found) for found in _nested_dataclasses(cls)) + "\n"


def _nested_dataclasses(cls: type) -> list[type]:
    """``cls``, then the dataclasses its field types mention at any depth, each once, in first-use order."""
    found: list[type] = []

    def visit(tp: Any) -> None:
        if dataclasses.is_dataclass(tp):
            if tp not in found:
                found.append(tp)
                for hint in _hints(tp).values():
                    visit(hint)
        else:
            for arg in get_args(tp):
                visit(arg)

    visit(cls)
    return found


def _describe_one(cls: type) -> str:
    hints = _hints(cls)
    lines = [f"### `{cls.__name__}`", ""]
    doc = _own_doc(cls)
    if doc:
        lines += [doc, ""]
    lines += ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for field in dataclasses.fields(cls):
        if field.init:
            help_text = _cell(str(field.metadata.get("help", "")))
            lines.append(f"| `{field.name}` | `{_type_name(hints[field.name])}` | {_default(field)} | {help_text} |")
    return "\n".join(lines)


def _own_doc(cls: type) -> str:
    """First paragraph of the class docstring, skipping the signature dataclass() writes when there is none."""
    doc = inspect.cleandoc(cls.__doc__ or "")
    if doc.startswith(f"{cls.__name__}("):
        return ""
    return _cell(doc.split("\n\n")[0])


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "*required*"
    if dataclasses.is_dataclass(value):
        return f"see `{type(value).__name__}`"
    return f"`{_cell(json.dumps(_plain(value), default=str))}`"


def _cell(text: str) -> str:
    """Make text safe inside one Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")
