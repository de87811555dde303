"""On-disk cache of tokenized features, so a second run skips tokenization.

The key covers everything the features depend on: the tokenizer (class, vocabulary, settings), the task
type and its resolved YAML, the examples themselves, and whether they are featurized for training.

An entry (``<key>.npz``) holds numpy arrays only and is read with ``allow_pickle=False``: a cache folder copied
from someone else is data, and reading it can execute nothing. Each feature is recorded under the registered
name of its class (``FEATURE_KINDS``: a fixed table, never an import of a name read from the file) and rebuilt
from ``dataclasses.fields`` of that class. Each field is stored as columns over all features of a kind, by one
of a fixed set of codecs chosen from the values (flat int arrays for token ids, (n, k) arrays for spans, tagged
JSON for anything else), so values come back exactly: ints as ints, tuples as tuples, None as None.
An entry that cannot be read back (corrupt, truncated, foreign, or an old ``<key>.pkl`` pickle) is logged,
ignored and rebuilt.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import hashlib
import json
import logging
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from itertools import chain, repeat
from operator import is_not
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from multitask.data.features import Feature, QAFeature, TaggingFeature
from multitask.utils import faults
from multitask.utils.atomic import atomic_path, remove_stale_temporaries
from multitask.utils.readback import parse_json

log = logging.getLogger(__name__)

CACHE_VERSION = 1
FORMAT = "multitask.features"
FORMAT_VERSION = 2  # version 1 was a pickle (<key>.pkl), which is never read
SUFFIX = ".npz"
LEGACY_SUFFIX = ".pkl"
META = "meta"
# RuntimeError: zipfile raises it (NotImplementedError among them) for header bits a damaged entry may hold: an
# unknown compression method or zip version, an encryption flag.
_UNREADABLE = (OSError, EOFError, ValueError, TypeError, KeyError, IndexError, RuntimeError,
               zipfile.BadZipFile, zlib.error)
# A temporary cache file not written to for this long belongs to a killed write.
STALE_WRITE_SECONDS = 3600.0


def tokenizer_fingerprint(tokenizer) -> str:
    digest = hashlib.sha256()
    digest.update(type(tokenizer).__name__.encode())
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update((backend.to_str() if backend is not None else repr(tokenizer.init_kwargs)).encode())
    return digest.hexdigest()


def _plain(value: Any) -> Any:
    return asdict(value) if is_dataclass(value) else value


def cache_key(tokenizer_hash: str, task_config: Any, examples: list[Any], training: bool) -> str:
    digest = hashlib.sha256(f"v{CACHE_VERSION}|{tokenizer_hash}|{training}".encode())
    digest.update(json.dumps(_plain(task_config), sort_keys=True, default=str).encode())
    for example in examples:
        digest.update(json.dumps(_plain(example), sort_keys=True, default=str, ensure_ascii=False).encode())
    return digest.hexdigest()[:32]


def cached(cache_dir: str | Path | None, key: str, build: Callable[[], Any]) -> tuple[Any, bool]:
    """Return (value, was_cached); a missing or unreadable cache entry is rebuilt and written atomically.

    ``build`` must return a list of registered features (``FEATURE_KINDS``); anything else is returned uncached.
    """
    if not cache_dir:
        return build(), False
    path = Path(cache_dir) / f"{key}{SUFFIX}"
    if path.exists():
        try:
            return read_features(path), True
        except _UNREADABLE as error:
            log.warning("ignoring unreadable feature cache entry %s (%s: %s); rebuilding it",
                        path, type(error).__name__, error)
    else:
        legacy = path.with_name(f"{key}{LEGACY_SUFFIX}")
        if legacy.exists():
            log.warning("ignoring feature cache entry %s: pickled entries are never loaded; rebuilding it as %s",
                        legacy, path.name)
    value = build()
    # Entries of writes killed mid-way; an hour idle, since other runs may share this cache and be writing now.
    remove_stale_temporaries(cache_dir, idle_seconds=STALE_WRITE_SECONDS)
    try:
        arrays = encode_features(value)
    except (TypeError, ValueError) as error:
        log.warning("features not cached at %s: %s", path, error)
        return value, False
    with atomic_path(path) as tmp:
        write_arrays(tmp, arrays)
        faults.reached("feature_cache_write")
    return value, False


# ---------------------------------------------------------------------------------------------- entries
# The Feature dataclasses a cache entry may hold, by the name it records them under.
FEATURE_KINDS: dict[str, type] = {"Feature": Feature, "TaggingFeature": TaggingFeature, "QAFeature": QAFeature}


def _field_names(cls: type) -> list[str]:
    return [field.name for field in dataclasses.fields(cls) if field.init]


def encode_features(features: Any) -> dict[str, np.ndarray]:
    """Named arrays holding a list of registered features; TypeError for anything else."""
    if not isinstance(features, list):
        raise TypeError(f"expected a list of features, got {type(features).__name__}")
    names = {cls: name for name, cls in FEATURE_KINDS.items()}
    kind_names: list[str] = []
    kind_of: dict[type, int] = {}
    order = []
    for feature in features:
        cls = type(feature)
        if cls not in kind_of:
            if cls not in names:
                raise TypeError(f"{cls.__qualname__} is not a registered feature kind")
            kind_of[cls] = len(kind_names)
            kind_names.append(names[cls])
        order.append(kind_of[cls])
    arrays: dict[str, np.ndarray] = {"kinds": _ints(order, len(order))}
    schemas: dict[str, list[list[str]]] = {}
    for index, name in enumerate(kind_names):
        cls = FEATURE_KINDS[name]
        members = [f for f, kind in zip(features, order) if kind == index]
        schemas[name] = []
        for field in _field_names(cls):
            codec, parts = _encode_column([getattr(member, field) for member in members])
            schemas[name].append([field, codec])
            arrays.update({f"{name}.{field}.{part}": array for part, array in parts.items()})
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "kinds": kind_names, "schemas": schemas}
    arrays[META] = _bytes_array(json.dumps(meta).encode())
    return arrays


def decode_features(arrays: Any) -> list[Any]:
    """Features from ``encode_features`` arrays (a mapping); ValueError when they are not exactly that."""
    meta = parse_json(_array(arrays, META, "u", 1).tobytes(), f"array {META!r}", "feature cache index",
                      error=ValueError)  # a miss, as any damage here
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"not a {FORMAT} v{FORMAT_VERSION} entry")
    kind_names, schemas = meta.get("kinds"), meta.get("schemas")
    if not isinstance(kind_names, list) or not isinstance(schemas, dict) or set(kind_names) != set(schemas) \
            or len(set(kind_names)) != len(kind_names):
        raise ValueError("malformed 'kinds' or 'schemas'")
    order = _array(arrays, "kinds", "iu", 1).tolist()
    counts = [order.count(index) for index in range(len(kind_names))]
    if sum(counts) != len(order):
        raise ValueError("feature kinds out of range")
    rebuilt = []
    for name, count in zip(kind_names, counts):
        cls = FEATURE_KINDS.get(name) if isinstance(name, str) else None
        if cls is None:
            raise ValueError(f"unknown feature kind {name!r}")
        schema, fields = schemas[name], _field_names(cls)
        if not (isinstance(schema, list) and all(isinstance(entry, list) and len(entry) == 2 for entry in schema)
                and [entry[0] for entry in schema] == fields):
            raise ValueError(f"the fields of {name} differ from {fields}")
        columns = []
        for field, codec in schema:
            if codec not in CODECS:
                raise ValueError(f"unknown codec {codec!r}")
            column = CODECS[codec][1](lambda part, kind, ndim: _array(arrays, f"{name}.{field}.{part}", kind, ndim))
            if len(column) != count:
                raise ValueError(f"{name}.{field} holds {len(column)} values for {count} features")
            columns.append(column)
        rebuilt.append(iter([cls(**dict(zip(fields, values))) for values in zip(*columns)]))
    return [next(rebuilt[index]) for index in order]


def write_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An .npz file (what ``np.load`` reads), deflated at a fast level."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as handle:
                np.lib.format.write_array(handle, np.ascontiguousarray(array), allow_pickle=False)


def read_features(path: Path) -> list[Any]:
    with np.load(path, allow_pickle=False) as arrays, _gc_paused():
        return decode_features(arrays)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while millions of acyclic lists and tuples are built (a third faster)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _array(arrays: Any, name: str, kinds: str, ndim: int) -> np.ndarray:
    array = arrays[name]
    if not isinstance(array, np.ndarray) or array.dtype.kind not in kinds or array.ndim != ndim:
        raise ValueError(f"array {name!r} has an unexpected type or shape")
    return array


def _bytes_array(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------- codecs
# Each codec encodes one column (a field's values over the features of one kind) into named arrays, or returns
# None when the values are not its shape; the first that fits is used, and "json" fits anything plain.
Parts = dict[str, np.ndarray]
Getter = Callable[[str, str, int], np.ndarray]  # (part, dtype kinds, ndim) -> array


def _encode_column(values: list[Any]) -> tuple[str, Parts]:
    for name, (encode, _) in CODECS.items():
        parts = encode(values)
        if parts is not None:
            return name, parts
    raise AssertionError("the json codec takes every plain value")


def _ints(values: Any, count: int, shape: tuple[int, ...] | None = None) -> np.ndarray | None:
    """The ints as the smallest signed integer array holding them; None when one does not fit in 64 bits."""
    try:
        array = np.fromiter(values, dtype=np.int64, count=count)
    except OverflowError:
        return None
    if shape is not None:
        array = array.reshape(shape)
    if array.size:
        low, high = int(array.min()), int(array.max())
        for dtype in (np.int8, np.int16, np.int32):
            info = np.iinfo(dtype)
            if info.min <= low and high <= info.max:
                return array.astype(dtype)
    return array


def _lengths(values: list[Any]) -> np.ndarray:
    return np.array([-1 if value is None else len(value) for value in values], dtype=np.int64)


def _split(flat: list[Any], lengths: np.ndarray) -> list[Any]:
    """``flat`` cut into lists of the given lengths (-1: None)."""
    if (lengths.size and int(lengths.min()) < -1) or int(lengths[lengths > 0].sum()) != len(flat):
        raise ValueError("lengths do not match the data")
    out, position = [], 0
    for length in lengths.tolist():
        if length < 0:
            out.append(None)
        else:
            out.append(flat[position : position + length])
            position += length
    return out


def _enc_ints(values: list[Any]) -> Parts | None:
    if not set(map(type, values)) <= {int}:
        return None
    data = _ints(values, len(values))
    return None if data is None else {"data": data}


def _dec_ints(get: Getter) -> list[Any]:
    return get("data", "iu", 1).tolist()


def _scalar_lists(scalar: type) -> tuple[Callable[[list[Any]], Parts | None], Callable[[Getter], list[Any]]]:
    """Values that are None or lists of ``scalar`` (int or float): one flat array plus lengths."""
    kind = "iu" if scalar is int else "f"

    def encode(values: list[Any]) -> Parts | None:
        if not set(map(type, values)) <= {list, type(None)}:
            return None
        lists = list(filter(None, values))
        if not set(map(type, chain.from_iterable(lists))) <= {scalar}:
            return None
        total = sum(map(len, lists))
        if scalar is int:
            data = _ints(chain.from_iterable(lists), total)
        else:
            data = np.fromiter(chain.from_iterable(lists), dtype=np.float64, count=total)
        return None if data is None else {"lengths": _lengths(values), "data": data}

    def decode(get: Getter) -> list[Any]:
        return _split(get("data", kind, 1).tolist(), get("lengths", "i", 1))

    return encode, decode


def _tuple_width(tuples: list[tuple]) -> int | None:
    """k when every tuple holds k >= 1 ints (1 for none at all); None otherwise."""
    widths = set(map(len, tuples))
    if len(widths) > 1 or 0 in widths or not set(map(type, chain.from_iterable(tuples))) <= {int}:
        return None
    return widths.pop() if widths else 1


def _tuple_parts(items: list[Any]) -> Parts | None:
    """Items that are None or tuples of k ints: a presence mask and a (present, k) array."""
    if not set(map(type, items)) <= {tuple, type(None)}:
        return None
    tuples = list(filter(functools.partial(is_not, None), items))
    width = _tuple_width(tuples)
    if width is None:
        return None
    data = _ints(chain.from_iterable(tuples), len(tuples) * width, (len(tuples), width))
    if data is None:
        return None
    return {"present": np.fromiter(map(is_not, items, repeat(None)), dtype=bool, count=len(items)), "data": data}


def _tuple_items(get: Getter) -> list[Any]:
    present, data = get("present", "b", 1), get("data", "iu", 2)
    if int(present.sum()) != data.shape[0]:
        raise ValueError("presence mask does not match the data")
    if data.shape[1] == 0:
        raise ValueError("malformed tuple data")
    tuples = list(zip(*(data[:, column].tolist() for column in range(data.shape[1]))))
    if len(tuples) == len(present):
        return tuples
    remaining = iter(tuples)
    return [next(remaining) if flag else None for flag in present.tolist()]


def _enc_tuples(values: list[Any]) -> Parts | None:
    return _tuple_parts(values)


def _enc_tuple_lists(values: list[Any]) -> Parts | None:
    """Values that are None or lists whose items are None or tuples of k ints (QA offsets, word positions)."""
    if not set(map(type, values)) <= {list, type(None)}:
        return None
    parts = _tuple_parts(list(chain.from_iterable(filter(None, values))))
    return None if parts is None else {**parts, "lengths": _lengths(values)}


def _dec_tuple_lists(get: Getter) -> list[Any]:
    return _split(_tuple_items(get), get("lengths", "i", 1))


def _enc_json(values: list[Any]) -> Parts:
    return {"data": _bytes_array(json.dumps([_encode_tagged(value) for value in values]).encode())}


def _dec_json(get: Getter) -> list[Any]:
    values = json.loads(get("data", "u", 1).tobytes())
    if not isinstance(values, list):
        raise ValueError("malformed json column")
    return [_decode_tagged(value) for value in values]


CODECS: dict[str, tuple[Callable[[list[Any]], Parts | None], Callable[[Getter], list[Any]]]] = {
    "ints": (_enc_ints, _dec_ints),
    "int_lists": _scalar_lists(int),
    "float_lists": _scalar_lists(float),
    "tuples": (_enc_tuples, _tuple_items),
    "tuple_lists": (_enc_tuple_lists, _dec_tuple_lists),
    "json": (_enc_json, _dec_json),
}

_PLAIN = (type(None), bool, int, float, str)


def _encode_tagged(value: Any) -> Any:
    """JSON for a value of any plain type: lists as lists, tuples as {"tuple": [...]}, dicts as {"dict": [[k, v]]}."""
    if type(value) in _PLAIN:
        return value
    if type(value) is list:
        return [_encode_tagged(item) for item in value]
    if type(value) is tuple:
        return {"tuple": [_encode_tagged(item) for item in value]}
    if type(value) is dict:
        return {"dict": [[_encode_tagged(key), _encode_tagged(item)] for key, item in value.items()]}
    raise TypeError(f"cannot cache a value of type {type(value).__qualname__}")


def _decode_tagged(value: Any) -> Any:
    if type(value) in _PLAIN:
        return value
    if type(value) is list:
        return [_decode_tagged(item) for item in value]
    if type(value) is dict and len(value) == 1:
        if type(value.get("tuple")) is list:
            return tuple(_decode_tagged(item) for item in value["tuple"])
        if type(value.get("dict")) is list and all(type(pair) is list and len(pair) == 2 for pair in value["dict"]):
            return {_decode_tagged(key): _decode_tagged(item) for key, item in value["dict"]}
    raise ValueError(f"malformed tagged value of type {type(value).__name__}")
