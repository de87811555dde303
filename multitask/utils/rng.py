"""Capture and restore every random number generator, so a resumed run continues exactly (and seed them all).

The captured state is plain data (ints, floats, strings, lists, tuples, tensors), so the training state that
holds it loads with ``torch.load(weights_only=True)``; numpy's key array is kept as a list of ints.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """This process's generators; on CUDA, only its own GPU's (``device``): the GPUs visible to a rank on resume
    may be fewer than those it saw here, and another rank's GPU is not this rank's to restore."""
    state = {"python": random.getstate(), "numpy": _numpy_state(), "torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda_device"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """The generators ``rng_state`` captured; the saved GPU stream goes to this process's GPU (``device``).

    States saved before per-rank capture hold every visible GPU's stream (``cuda``): this device's index is taken
    where it exists, else the first, so a run resumed on fewer GPUs continues instead of failing."""
    random.setstate(state["python"])
    np.random.set_state(_numpy_legacy_state(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if device is None or device.type != "cuda":
        return
    saved = state.get("cuda_device")
    if saved is None and state.get("cuda"):
        streams = state["cuda"]
        index = device.index if device.index is not None else torch.cuda.current_device()
        saved = streams[index] if index < len(streams) else streams[0]
    if saved is not None:
        torch.cuda.set_rng_state(saved, device)


def _numpy_state() -> tuple[Any, ...]:
    """numpy's global state, ("MT19937", key, pos, has_gauss, cached_gaussian), with the key array as a list."""
    name, key, *rest = np.random.get_state(legacy=True)
    return (name, key.tolist(), *(value.item() if isinstance(value, np.generic) else value for value in rest))


def _numpy_legacy_state(state: Any) -> tuple[Any, ...]:
    """The tuple ``np.random.set_state`` takes, from ``_numpy_state`` (or from an older state with an array)."""
    name, key, *rest = state
    return (name, np.asarray(key, dtype=np.uint32), *rest)
