"""Typed YAML configuration: strict loading into dataclasses, ``--set`` overrides, Markdown reference."""

from multitask.config.loader import (
    LineMap,
    apply_overrides,
    describe,
    from_dict,
    load_config,
    load_yaml,
    to_dict,
)

__all__ = [
    "LineMap",
    "apply_overrides",
    "describe",
    "from_dict",
    "load_config",
    "load_yaml",
    "to_dict",
]
