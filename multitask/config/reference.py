"""The Markdown reference of a config: one table of keys per dataclass, generated from the dataclasses themselves
(types, defaults, ``field(metadata={"help": ...})``), so the documented keys cannot drift from the code."""

from __future__ import annotations

import dataclasses
import inspect
import json
from typing import Any, get_args

from multitask.config.building import field_types, plain, type_name


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
                for hint in field_types(tp).values():
                    visit(hint)
        else:
            for arg in get_args(tp):
                visit(arg)

    visit(cls)
    return found


def _describe_one(cls: type) -> str:
    hints = field_types(cls)
    lines = [f"### `{cls.__name__}`", ""]
    doc = _own_doc(cls)
    if doc:
        lines += [doc, ""]
    lines += ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for field in dataclasses.fields(cls):
        if field.init:
            help_text = _cell(str(field.metadata.get("help", "")))
            lines.append(f"| `{field.name}` | `{type_name(hints[field.name])}` | {_default(field)} | {help_text} |")
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
    return f"`{_cell(json.dumps(plain(value), default=str))}`"


def _cell(text: str) -> str:
    """Make text safe inside one Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")
