"""Atomic file writes: a reader (or a crash) never sees a half-written file replace a good one."""

from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from multitask.utils import faults


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is fsynced and renamed over ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        faults.reached(f"write:{target.name}")
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def ensure_writable(directory: str | os.PathLike) -> None:
    """Fail before any work when ``directory`` cannot hold new files (read-only, or no space left at all)."""
    from multitask.errors import CheckpointError

    target = Path(directory)
    try:
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target, prefix=".write-check.", suffix=".tmp"):
            pass
    except OSError as error:
        raise CheckpointError(f"{target}: cannot write the run there ({error.strerror or error}); choose another "
                              f"--output-dir or free the disk") from error


def remove_stale_temporaries(directory: str | os.PathLike, idle_seconds: float = 0.0) -> list[Path]:
    """Delete the temporary files that writes killed mid-way left under ``directory`` (never a finished file).

    ``idle_seconds``: only those not written to for that long, for a folder other processes may be writing to
    right now (a feature cache shared by runs)."""
    now = time.time()
    stale = []
    for path in Path(directory).rglob(".*.tmp"):
        try:
            if path.is_file() and now - path.stat().st_mtime >= idle_seconds:
                path.unlink()
                stale.append(path)
        except FileNotFoundError:  # its writer finished (renamed it) or another run removed it meanwhile
            continue
    return stale


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
