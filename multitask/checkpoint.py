"""The small checkpoint (folded prefixes + heads + label maps + configs + encoder identity): what training
writes and inference, serving, growing and ``prefix.init_from`` read, so it sits below all of them.

Layout of a run directory::

    checkpoint/model.safetensors   prefixes (folded to flat keys/values) and heads; never encoder weights
    checkpoint/meta.json           tasks (resolved YAML + labels), prefix layout, encoder name + fingerprint

Every file is written atomically, and a checkpoint directory is swapped in whole, so an interrupted write
never replaces a good checkpoint. The resume state beside it (``state/``) is training's own:
:mod:`multitask.training.state`.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from multitask.errors import CheckpointError
from multitask.utils import faults
from multitask.model import MultiTaskModel
from multitask.utils.atomic import write_json
from multitask.utils.readback import read_json_file, require_shape

CHECKPOINT = "checkpoint"
FORMAT_VERSION = 1


def _folded_state(model: MultiTaskModel) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = {f"heads.{k}": v.detach().cpu().contiguous() for k, v in model.heads.state_dict().items()}
    layout: dict[str, Any] = {"prefixes": {}, "task_prefixes": {}}
    if model.prefix_bank is not None:
        for name, encoder in model.prefix_bank.encoders.items():
            folded = encoder.fold()
            state[f"prefix_bank.encoders.{name}.embedding"] = folded.embedding.detach().cpu().contiguous()
            layout["prefixes"][name] = asdict(folded.config)
        layout["task_prefixes"] = {t: list(p) for t, p in model.prefix_bank.layout.task_prefixes.items()}
        layout["attention"] = dict(model.prefix_bank.layout.attention)
        if model.prefix_bank.mixtures:  # input-dependent: saved as they are (their sources are buffers in them)
            layout["mixtures"] = {name: list(s) for name, s in model.prefix_bank.layout.mixtures.items()}
            state.update({f"prefix_bank.mixtures.{k}": v.detach().cpu().contiguous()
                          for k, v in model.prefix_bank.mixtures.state_dict().items()})
    if model.prompt_bank is not None:  # input prompts, folded: the tokens themselves, no prompt encoder
        for task, prompt in model.prompt_bank.prompts.items():
            state[f"prompt_bank.prompts.{task}.embedding"] = prompt.fold().embedding.detach().cpu().contiguous()
    # Encoder weights only when they were trained (LoRA branches, or everything under full fine-tuning).
    state.update({f"encoder.{k}": p.detach().cpu().contiguous()
                  for k, p in model.encoder.named_parameters() if p.requires_grad})
    return state, layout


def save_checkpoint(run_dir: Path, model: MultiTaskModel, meta: dict[str, Any]) -> Path:
    """The model's prefixes and prompts (folded) and heads, with ``meta`` and the prefix layout (see
    :func:`write_checkpoint`)."""
    state, layout = _folded_state(model)
    return write_checkpoint(run_dir, state, {**meta, "prefix_layout": layout})


def write_checkpoint(run_dir: Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write checkpoint/ beside the old one, then swap directories, so a crash leaves one complete checkpoint."""
    final = run_dir / CHECKPOINT
    staging = run_dir / f".{CHECKPOINT}.new"
    previous = run_dir / f".{CHECKPOINT}.old"
    if not final.exists() and previous.exists():  # a swap killed between its renames: put the last one back first
        previous.rename(final)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file(state, str(staging / "model.safetensors"))
    write_json(staging / "meta.json", {**meta, "format_version": FORMAT_VERSION,
                                       "model_sha256": file_sha256(staging / "model.safetensors")})
    shutil.rmtree(previous, ignore_errors=True)
    if final.exists():
        final.rename(previous)
    faults.reached("checkpoint_swap")
    staging.rename(final)
    shutil.rmtree(previous, ignore_errors=True)
    return final


def checkpoint_dir(run_dir: Path) -> Path:
    """The complete checkpoint, also when a crash struck between the two renames of a swap."""
    for candidate in (run_dir / CHECKPOINT, run_dir / f".{CHECKPOINT}.old"):
        if (candidate / "meta.json").exists() and (candidate / "model.safetensors").exists():
            return candidate
    raise CheckpointError(f"{run_dir}: no checkpoint found (expected {run_dir / CHECKPOINT}/meta.json)")


# What every reader of meta.json indexes (loading a run, serving it, prefix.init_from), checked once on reading.
META_SHAPE = {
    "encoder": {"name": str, "fingerprint": str}, "method": str, "experiment": dict,
    "tasks": [{"config": dict, "labels": list}],
    "prefix_layout": {"prefixes": {str: dict}, "task_prefixes": {str: list}},
}
META_HINT = "restore the run from a copy, or retrain it"


def read_meta(directory: Path) -> dict[str, Any]:
    """``directory``/meta.json, in the shape META_SHAPE gives; a CheckpointError naming it (one line) if not."""
    path = directory / "meta.json"
    meta = read_json_file(path, "checkpoint metadata", hint=META_HINT)
    require_shape(meta, META_SHAPE, str(path), "checkpoint metadata", hint=META_HINT)
    # Checkpoints written before checksums have none.
    require_shape(meta.get("model_sha256", ""), str, str(path), "checkpoint metadata", hint=META_HINT,
                  where="model_sha256")
    return meta


def read_checkpoint(run_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    directory = checkpoint_dir(run_dir)
    meta = read_meta(directory)
    weights = directory / "model.safetensors"
    expected = meta.get("model_sha256")  # checkpoints written before checksums have none
    if expected is not None and file_sha256(weights) != expected:
        raise CheckpointError(f"{weights}: corrupt (its checksum differs from the one in meta.json); restore it from "
                              f"a copy or retrain")
    try:
        return meta, load_file(str(weights))
    except Exception as error:  # safetensors raises its own error types for truncated or malformed files
        raise CheckpointError(f"{weights}: unreadable ({type(error).__name__}: {error})") from None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
