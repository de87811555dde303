"""Reading a YAML config file: safe, strict scalars, no duplicate keys, and the line of every key path.

Scalars resolve in the spirit of YAML 1.2: ``1e-3`` is a float (PyYAML alone reads it as a string), only
``true``/``false`` are booleans (``yes``, ``no``, ``on``, ``off`` stay strings, so ``fp16: yes`` is reported rather
than guessed), and dates stay strings (a run named ``2024-01-01`` is not turned into a ``datetime.date``). The line
map lets type errors found long after parsing still point at a line.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from multitask.errors import ConfigError

LineMap = dict[str, int]
"""Dotted key path (``tasks.0.batch_size``) -> 1-based line of that key or list item in the file."""

_BOOL_TAG = "tag:yaml.org,2002:bool"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_MAX_SHOWN = 60


class StrictLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2-like implicit scalars (see the module docstring for why)."""


StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_BOOL_TAG, _TIMESTAMP_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
StrictLoader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
StrictLoader.add_implicit_resolver(  # exponent floats PyYAML misses: 1e-3, 5E4, 1.0e5, .5e-2
    _FLOAT_TAG,
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def load_yaml(path: str | Path) -> tuple[Any, LineMap]:
    """Parse a YAML file safely and return its data with the line of every key path.

    The line map is what lets later type errors, found long after parsing, still point at a line.
    Duplicate keys are rejected, because PyYAML would silently keep the last one.
    """
    source = str(path)
    text = _read(path, source)
    loader = None
    try:
        loader = StrictLoader(text)  # rejects control characters (NUL...) here, before parsing
        node = loader.get_single_node()
        lines: LineMap = {}
        if node is not None:
            _record_lines(node, "", source, lines, set())
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        line, problem = yaml_problem(exc)
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
        raise ConfigError(f"{where}: expected a mapping of keys at the top level, got {show(data)}")
    return data, lines


def _read(path: str | Path, source: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise ConfigError(f"{source}: cannot read the file: {reason}") from None


def yaml_problem(exc: yaml.YAMLError) -> tuple[int | None, str]:
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
            child = join_path(path, key)
            if key in first_seen:
                raise ConfigError(
                    f"{source}:{line}: key {child!r}: duplicate key (first set on line {first_seen[key]})"
                )
            first_seen[key] = lines[child] = line
            _record_lines(value_node, child, source, lines, seen)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = join_path(path, str(index))
            lines[child] = item.start_mark.line + 1
            _record_lines(item, child, source, lines, seen)


def show(value: Any) -> str:
    """repr() cut short, so one huge value cannot turn an error into a wall of text."""
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def join_path(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
