"""Capture and restore every random number generator, so a resumed run continues exactly.

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


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": _numpy_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(_numpy_legacy_state(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state() -> tuple[Any, ...]:
    """numpy's global state, ("MT19937", key, pos, has_gauss, cached_gaussian), with the key array as a list."""
    name, key, *rest = np.random.get_state(legacy=True)
    return (name, key.tolist(), *(value.item() if isinstance(value, np.generic) else value for value in rest))


def _numpy_legacy_state(state: Any) -> tuple[Any, ...]:
    """The tuple ``np.random.set_state`` takes, from ``_numpy_state`` (or from an older state with an array)."""
    name, key, *rest = state
    return (name, np.asarray(key, dtype=np.uint32), *rest)
