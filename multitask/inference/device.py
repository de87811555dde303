"""Where and in which precision a model runs: the device named in a config, and the matching autocast context."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from multitask.errors import ConfigError
from multitask.inference.precision import resolve_precision


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else the CPU; anything else is taken as a torch device name."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} is not a device torch knows (expected auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for, but torch sees no CUDA device here")
    return device


def autocast(device: torch.device, precision: str):
    precision = resolve_precision(precision, device)[0]
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
