"""The resume state (``state/training_state.pt``): everything ``--resume`` needs (trainable weights, optimiser,
RNGs, sampler...), with a checksum file beside it.

Nothing read back can run code: the state holds tensors and plain containers only and is loaded with
``weights_only=True``, so a run directory copied from someone else cannot execute what it holds. Written
atomically, and both the old and the new checksum stay valid while one state replaces the other.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch

from multitask.checkpoint import file_sha256
from multitask.errors import CheckpointError
from multitask.model import MultiTaskModel
from multitask.utils.atomic import atomic_path, write_text
from multitask.utils.readback import read_text_file

STATE_FILE = Path("state") / "training_state.pt"
SHA256 = re.compile(r"[0-9a-f]{64}")


def trainable_state(model: MultiTaskModel) -> dict[str, torch.Tensor]:
    """The trained weights only (prefix bank and heads, plus the encoder when it was fine-tuned)."""
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in names}


def _checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _read_checksums(path: Path) -> list[str]:
    """The SHA-256 checksums listed in ``path``; a CheckpointError naming it when it is damaged."""
    what, hint = "training-state checksums", "start the run afresh without --resume, or delete it to resume unchecked"
    checksums = read_text_file(path, what, hint=hint).split()
    bad = next((number for number, value in enumerate(checksums, 1) if not SHA256.fullmatch(value)), None)
    if bad is not None:
        raise CheckpointError(f"{path}: unreadable {what}: entry {bad} is not a SHA-256 checksum (64 hex digits); "
                              f"{hint}")
    return checksums


def save_training_state(run_dir: Path, state: dict[str, Any]) -> None:
    """Write the state as plain data (tensors, numbers, strings, lists, tuples, dicts), which ``weights_only``
    loading accepts: a dataclass value (the trainer's history) is saved as the dict of its fields."""
    plain = {key: asdict(value) if is_dataclass(value) and not isinstance(value, type) else value
             for key, value in state.items()}
    path = run_dir / STATE_FILE
    checksums = _checksum_path(path)
    with atomic_path(path) as tmp:
        torch.save(plain, tmp)
        checksum = file_sha256(tmp)
        # While the new state replaces the old one, both checksums are valid: a kill at any moment leaves the
        # state file matching one of them.
        try:
            previous = _read_checksums(checksums) if checksums.exists() else []
        except CheckpointError:  # damaged, and about to be replaced: no checksum in it can vouch for a state
            previous = []
        write_text(checksums, "\n".join([*previous, checksum]) + "\n")
    write_text(checksums, checksum + "\n")


def load_training_state(run_dir: Path) -> dict[str, Any] | None:
    """The saved state, loaded with ``weights_only=True``: a file holding anything but plain data (a planted
    pickle, a state from a version that saved objects) is refused with a CheckpointError, never executed."""
    path = run_dir / STATE_FILE
    if not path.exists():
        return None
    checksums = _checksum_path(path)
    if checksums.exists() and file_sha256(path) not in _read_checksums(checksums):
        raise CheckpointError(f"{path}: corrupt or truncated (its checksum differs from {checksums.name}); the run "
                              f"cannot resume from it: start it afresh without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{path}: refused to load a training state that holds more than tensors and plain "
                              f"data ({_refusal_reason(error)}); it was not written by this version of multitask, "
                              f"or was tampered with, and is never executed. Start the run afresh without --resume"
                              ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"{path}: unreadable training state ({type(error).__name__}: {error})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a training state (a {type(state).__name__}, not a dict)")
    return state


def _refusal_reason(error: Exception) -> str:
    """What torch's weights-only unpickler objected to, without its advice to load the file unsafely instead."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in str(error).splitlines()]
    reasons = [line for line in lines
               if line and not line.startswith(boilerplate) and line != "WeightsUnpickler error:"]
    return reasons[-1] if reasons else "unsupported content"
