"""Where and in which precision a model runs: the device named in a config, the matching autocast context, and
what a GPU run sets up for speed (TF32, a half-precision frozen encoder). Training, inference and serving all
place models, so it sits below them."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from functools import lru_cache

import torch

from multitask.backbone import encoder_fingerprint
from multitask.errors import ConfigError
from multitask.precision import resolve_precision

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else the CPU (said in the log: a user expecting a GPU should not learn it
    from the step time); anything else is taken as a torch device name."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        _say_cpu_fallback()
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} is not a device torch knows (expected auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for, but torch sees no CUDA device here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r} was asked for, but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device


@lru_cache(maxsize=None)  # once per process: a server resolves the device for every run it loads
def _say_cpu_fallback() -> None:
    log.info("device auto: no CUDA device visible to torch, running on the CPU")


def autocast(device: torch.device, precision: str):
    precision = resolve_precision(precision, device)[0]
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def describe_device(device: torch.device) -> str:
    """The device as the log and the report name it: the GPU's model, or the CPU."""
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def enable_tf32(device: torch.device) -> bool:
    """TensorFloat-32 matrix products for fp32 work on CUDA (Ampere and later; elsewhere the setting does nothing):
    a 10-bit mantissa in the products, fp32 sums, several times the fp32 throughput. The CPU is left as it is.
    Returns whether it is on."""
    if device.type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Methods whose encoder weights never train: their frozen matrices can be held in the run's half precision.
HALF_ENCODER_METHODS = ("prefix", "prompt", "linear_probe")


def frozen_encoder_dtype(device: torch.device, precision: str, method: str) -> torch.dtype | None:
    """The half precision a frozen encoder is held in on CUDA (None: as loaded, fp32). On a GPU, autocast would
    otherwise re-cast every frozen matrix in every forward, and the fp32 copies take twice the memory; the CPU
    keeps fp32 weights, so its results stay as they are."""
    if device.type != "cuda" or method not in HALF_ENCODER_METHODS:
        return None
    return HALF_DTYPES.get(resolve_precision(precision, device)[0])


def cast_frozen_encoder(model, device: torch.device, precision: str, method: str) -> str | None:
    """Hold the encoder's linear layers of a frozen-encoder method in the run's half precision on CUDA; returns
    the dtype's name, or None when nothing was cast.

    Only the matrices (nn.Linear) are cast: they are what autocast would cast, and most of the memory. Embeddings
    and LayerNorms stay fp32, so code that reads them outside autocast (input summaries of mixtures) is unchanged
    and normalisation keeps its precision. The fingerprint is taken first: it names the weights as loaded, which
    is what checkpoints record and check."""
    dtype = frozen_encoder_dtype(device, precision, method)
    encoder = model.encoder
    if dtype is None or any(p.requires_grad for p in encoder.parameters()):
        return None
    encoder_fingerprint(encoder)  # kept per object and weight version; a cast changes neither
    cast_linear_layers(encoder, dtype)
    return str(dtype).removeprefix("torch.")


def cast_linear_layers(module: torch.nn.Module, dtype: torch.dtype) -> None:
    for layer in module.modules():
        if isinstance(layer, torch.nn.Linear):
            layer.to(dtype)
