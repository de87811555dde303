"""Typed YAML configuration: strict loading into dataclasses, ``--set`` overrides, Markdown reference."""

from multitask.config.building import from_dict, to_dict
from multitask.config.loader import load_config
from multitask.config.overrides import apply_overrides
from multitask.config.reading import LineMap, load_yaml
from multitask.config.reference import describe

__all__ = [
    "LineMap",
    "apply_overrides",
    "describe",
    "from_dict",
    "load_config",
    "load_yaml",
    "to_dict",
]
