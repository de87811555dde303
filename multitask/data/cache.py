"""On-disk cache of tokenized features, so a second run skips tokenization.

The key covers everything the features depend on: the tokenizer (class, vocabulary, settings), the task
type and its resolved YAML, the examples themselves, and whether they are featurized for training.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Callable

from multitask.utils.atomic import atomic_path

CACHE_VERSION = 1


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
    """Return (value, was_cached); a missing or unreadable cache entry is rebuilt and written atomically."""
    if not cache_dir:
        return build(), False
    path = Path(cache_dir) / f"{key}.pkl"
    if path.exists():
        try:
            with open(path, "rb") as handle:
                return pickle.load(handle), True
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError):
            pass  # a stale entry from an older layout: rebuild it
    value = build()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            pickle.dump(value, handle, protocol=pickle.HIGHEST_PROTOCOL)
    return value, False
