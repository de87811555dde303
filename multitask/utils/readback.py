"""Reading back the text files multitask wrote: checksums, checkpoint/meta.json, config.json, report.json, cache
indexes.

Such a file can be damaged after it was written (a disk error, a copy cut short, an editor saving it in another
encoding, the wrong file pasted over it). Every reader goes through here, so that each kind of damage (bytes that
are not UTF-8, an empty file, truncated or invalid JSON, JSON of the wrong shape) ends in the same one-line error
naming the file and what is wrong with it, never in a UnicodeDecodeError or KeyError from deep inside. The caller
chooses the error class, and so what the damage means: a refusal (CheckpointError, DataError) or, for a cache, a
miss (ValueError). Messages never quote the file's content, which may hold anything (control characters, newlines).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from multitask.errors import CheckpointError

Shape = Any  # a type; {key: Shape} (an object with these keys); {str: Shape} (any keys); [Shape] (a list)
_JSON_NAMES = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
               float: "a number", type(None): "null"}


def read_text_file(path: str | os.PathLike, what: str, *, error: type[Exception] = CheckpointError,
                   hint: str = "") -> str:
    """The file's UTF-8 text; ``error`` ("PATH: unreadable WHAT: PROBLEM[; HINT]") when it is not UTF-8 or empty.
    A file that cannot be opened raises its OSError, which the CLI reports as one line too."""
    return decode_text(Path(path).read_bytes(), str(path), what, error=error, hint=hint)


def read_json_file(path: str | os.PathLike, what: str, expected: type | None = dict, *,
                   error: type[Exception] = CheckpointError, hint: str = "") -> Any:
    """The file's JSON value, which must be an ``expected`` (None: anything); ``error`` as read_text_file."""
    return parse_json(Path(path).read_bytes(), str(path), what, expected, error=error, hint=hint)


def parse_json(data: bytes, source: str, what: str, expected: type | None = dict, *,
               error: type[Exception] = CheckpointError, hint: str = "") -> Any:
    """The JSON value of ``data`` (the content of ``source``), checked as read_json_file checks a file's."""
    text = decode_text(data, source, what, error=error, hint=hint)
    try:
        value = json.loads(text)
        # No file multitask writes holds a lone surrogate (it could not be encoded as UTF-8): one would only fail
        # later, when a message or output quoting it is printed.
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except json.JSONDecodeError as exc:
        problem = "truncated JSON" if _cut_short(text, exc) else "invalid JSON"
        place = f"{exc.msg.removesuffix(' at')} at line {exc.lineno} column {exc.colno}"
        raise _failure(error, source, what, f"{problem} ({place})", hint) from None
    except UnicodeEncodeError:
        raise _failure(error, source, what, "a string holds an unpaired surrogate escape (\\ud800-\\udfff)",
                       hint) from None
    except RecursionError:
        raise _failure(error, source, what, "JSON nested too deeply", hint) from None
    if expected is not None and not _is(value, expected):
        raise _failure(error, source, what, f"expected a JSON {_json_name(expected)}, got {_described(value)}", hint)
    return value


def decode_text(data: bytes, source: str, what: str, *, error: type[Exception] = CheckpointError,
                hint: str = "") -> str:
    """``data`` (the content of ``source``) as UTF-8 text, which must hold more than whitespace."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        problem = f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        raise _failure(error, source, what, problem, hint) from None
    if not text.strip():
        raise _failure(error, source, what, "empty" if not data else "blank (whitespace only)", hint)
    return text


def require_shape(value: Any, shape: Shape, source: str, what: str, *, error: type[Exception] = CheckpointError,
                  hint: str = "", where: str = "") -> None:
    """``error`` naming the first key that is missing or holds the wrong type (``where``: the path to ``value``).

    ``shape``: a type (int excludes bool); ``{key: shape}`` for an object holding at least these keys;
    ``{str: shape}`` for an object whose every value has that shape; ``[shape]`` for a list of such items."""
    def fail(problem: str) -> Exception:
        return _failure(error, source, what, problem, hint)

    here = where or "the file"
    if isinstance(shape, list):
        if not isinstance(value, list):
            raise fail(f"{here} should be a list, got {_described(value)}")
        for index, item in enumerate(value):
            require_shape(item, shape[0], source, what, error=error, hint=hint, where=f"{where}[{index}]")
    elif isinstance(shape, dict):
        if not isinstance(value, dict):
            raise fail(f"{here} should be an object, got {_described(value)}")
        if str in shape:  # any keys: repr, since the keys come from the file
            items = [(f"{where}[{key!r}]", item, shape[str]) for key, item in value.items()]
        else:
            missing = next((key for key in shape if key not in value), None)
            if missing is not None:
                raise fail(f"missing key {missing!r}" + (f" in {where}" if where else ""))
            items = [(_join(where, key), value[key], inner) for key, inner in shape.items()]
        for inner_where, item, inner in items:
            require_shape(item, inner, source, what, error=error, hint=hint, where=inner_where)
    elif not _is(value, shape):
        raise fail(f"{here} should be {_json_name(shape, article=True)}, got {_described(value)}")


def _cut_short(text: str, error: json.JSONDecodeError) -> bool:
    """Whether the parser stopped for want of more text: in a string, in the last token, or at the very end."""
    if error.msg.startswith("Extra data"):  # a complete value, then more
        return False
    rest = text[error.pos:].rstrip()
    return error.msg.startswith("Unterminated string") or not re.search(r"[\s,:\[\]{}]", rest)


def _failure(error: type[Exception], source: str, what: str, problem: str, hint: str) -> Exception:
    return error(f"{source}: unreadable {what}: {problem}" + (f"; {hint}" if hint else ""))


def _is(value: Any, kind: type) -> bool:
    return isinstance(value, kind) and not (isinstance(value, bool) and kind in (int, float))


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _described(value: Any) -> str:
    return _JSON_NAMES.get(type(value), f"a {type(value).__name__}")


def _json_name(kind: type, article: bool = False) -> str:
    name = _JSON_NAMES.get(kind, f"a {kind.__name__}")
    return name if article or name == "null" else name.split(" ", 1)[1]
