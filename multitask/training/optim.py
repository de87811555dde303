"""Optimiser with separate learning rates for prefixes, heads and (full fine-tuning) encoder, and the LR schedule."""

from __future__ import annotations

import math

import torch

from multitask.experiment import OptimizationConfig
from multitask.model import MultiTaskModel


def _no_decay(name: str) -> bool:
    return name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name


def learning_rate(name: str, config: OptimizationConfig) -> float:
    """Each kind of trained weight has its own rate: prefixes ~1e-2, heads ~1e-3, LoRA ~5e-4, encoder ~3e-5."""
    if name.startswith("prefix_bank."):
        return config.prefix_lr
    if name.startswith("heads."):
        return config.head_lr
    if ".lora_" in name:
        return config.lora_lr
    return config.encoder_lr


def build_optimizer(model: MultiTaskModel, config: OptimizationConfig) -> torch.optim.AdamW:
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        lr = learning_rate(name, config)
        decay = 0.0 if _no_decay(name) else config.weight_decay
        groups.setdefault((lr, decay), []).append(parameter)
    return torch.optim.AdamW(
        [{"params": params, "lr": lr, "weight_decay": decay} for (lr, decay), params in groups.items()]
    )


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimizationConfig, total_steps: int):
    warmup = int(config.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if config.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if config.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1.0 - progress)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
