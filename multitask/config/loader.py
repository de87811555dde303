"""Typed, strict configuration: a YAML file, ``--set`` overrides, then validated dataclasses.

Every mistake becomes a one-line ConfigError that says where to look (file and line, or the ``--set`` override at
fault), which key, and what was expected, so a user can fix a config without reading a traceback. The steps live
in their own modules: :mod:`~multitask.config.reading`, :mod:`~multitask.config.overrides`,
:mod:`~multitask.config.building` (and :mod:`~multitask.config.reference` for the documentation).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TypeVar

from multitask.config.building import from_dict
from multitask.config.overrides import apply_overrides_with_origins
from multitask.config.reading import load_yaml

T = TypeVar("T")


def load_config(cls: type[T], path: str | Path, overrides: Iterable[str] = ()) -> T:
    """Load a YAML file, apply ``--set`` overrides and build ``cls``; errors name the file or the override."""
    data, lines = load_yaml(path)
    data, origins = apply_overrides_with_origins(data, overrides, "--set")
    return from_dict(cls, data, source=str(path), lines=lines, origins=origins)
