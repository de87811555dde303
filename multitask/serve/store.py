"""A model store: a folder whose sub-folders are trained runs, each served under its folder's name.

The store is read by listing it and looking at file stamps (modification time and size of each run's checkpoint
files), which costs a few system calls per run, so a store of thousands of runs can be scanned every second. A run
is loaded only when its stamp is new, and only whole: the checkpoint's own checksum must match its weights
(:func:`multitask.checkpoint.read_checkpoint`), so a run still being copied in fails that check, is logged
once, and is tried again when its files change.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CHECKPOINT_FILES = ("meta.json", "model.safetensors")


@dataclass(frozen=True)
class StoredRun:
    name: str
    path: Path
    stamp: tuple[int, ...]  # what changes when the run's checkpoint changes


def _stamp(checkpoint: Path) -> tuple[int, ...] | None:
    """The checkpoint's files' inode, modification time and size, or None while it is incomplete."""
    parts: list[int] = []
    for name in CHECKPOINT_FILES:
        try:
            info = os.stat(checkpoint / name)
        except OSError:
            return None
        parts += [info.st_ino, info.st_mtime_ns, info.st_size]
    return tuple(parts)


def scan_store(root: Path) -> dict[str, StoredRun]:
    """Every run folder of ``root`` with a complete-looking checkpoint (hidden folders are skipped: staging areas)."""
    runs = {}
    try:
        children = sorted(os.scandir(root), key=lambda entry: entry.name)
    except FileNotFoundError:
        return {}
    for entry in children:
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        path = Path(entry.path)
        # A checkpoint being swapped (multitask writes checkpoint/ beside the old one, then renames) is read from
        # the old copy for the instant between the renames.
        for checkpoint in (path / "checkpoint", path / ".checkpoint.old"):
            stamp = _stamp(checkpoint)
            if stamp is not None:
                runs[entry.name] = StoredRun(entry.name, path, stamp)
                break
    return runs
