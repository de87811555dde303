"""``--set key.path=value`` overrides: applied to the plain data before it is built, each remembered, so an error
on an overridden key names the override rather than a line of the file."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from multitask.config.reading import StrictLoader, show, yaml_problem
from multitask.errors import ConfigError


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str], source: str = "--set") -> dict:
    """Return a copy of ``data`` with each ``key.path=value`` override applied, in order.

    Values are parsed as YAML (``3``, ``1e-3``, ``true``, ``null``, ``[a, b]``); an empty value is
    null, so write ``key=''`` for an empty string. Missing (or null) intermediate keys become
    mappings; a numeric key indexes an existing list item. Types are checked later by ``from_dict``.
    """
    return apply_overrides_with_origins(data, overrides, source)[0]


def apply_overrides_with_origins(
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
        return keys, yaml.load(text, Loader=StrictLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{label}: invalid YAML value: {yaml_problem(exc)[1]}") from None


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
                f"{label}: cannot set a key inside '{'.'.join(keys[: depth + 1])}', which holds {show(child)}"
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
