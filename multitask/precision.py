"""Which autocast precision a run uses: ``auto`` picks bf16 where the hardware computes it natively (fp16 on older
GPUs)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

# CPU flags of native bf16 matrix arithmetic (x86: AVX512-BF16 or AMX; Arm: the BF16 extension).
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


@lru_cache(maxsize=None)  # autocast() resolves "auto" on every evaluation batch: read the file once
def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


def bf16_supported(device: torch.device, flags: set[str] | None = None) -> bool:
    """Whether the device computes bf16 natively. On CUDA, emulated bf16 (V100, T4: before compute capability 8.0)
    does not count: it runs slower attention kernels than fp16 there."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool((cpu_flags() if flags is None else flags) & set(CPU_BF16_FLAGS))
    return False


def resolve_precision(requested: str, device: torch.device, flags: set[str] | None = None) -> tuple[str, str]:
    """The precision to use, and why (for the log and the report). ``auto`` on a GPU without native bf16 takes fp16
    (with the gradient scaler, in training): every CUDA card computes it natively, and it beats fp32 there."""
    if requested != "auto":
        return requested, "set in the experiment"
    if bf16_supported(device, flags):
        return "bf16", f"auto: {device.type} computes bf16 natively"
    if device.type == "cuda":
        return "fp16", "auto: no native bf16 on this GPU; fp16 with the gradient scaler"
    return "fp32", f"auto: no native bf16 on this {device.type}"
