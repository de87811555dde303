"""Optimiser with separate learning rates for prefixes, heads and (full fine-tuning) encoder, and the LR schedule."""

from __future__ import annotations

import math

import torch

from multitask.experiment import OptimizationConfig
from multitask.model import MultiTaskModel
from multitask.tuning import TaskTuning


def _no_decay(name: str) -> bool:
    return name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name


def learning_rate(name: str, model: MultiTaskModel, config: OptimizationConfig, tunings: dict[str, TaskTuning]) -> float:
    """Each kind of trained weight has its own rate: a prefix and a head that of its task (a prefix several tasks
    share, the smallest of theirs), input prompts ``prompt.lr``, LoRA ``lora_lr``, encoder weights (full
    fine-tuning) ``encoder_lr``."""
    parts = name.split(".")
    if parts[0] == "prefix_bank" and model.prefix_bank is not None:
        users = [t for t, names in model.prefix_bank.layout.task_prefixes.items() if parts[2] in names]
        return min(tunings[t].prefix_lr for t in users)
    if parts[0] == "heads":
        return tunings[parts[1]].head_lr
    if parts[0] == "prompt_bank":
        return model.prompt_bank.config.learning_rate
    if ".lora_" in name:
        return config.lora_lr
    return config.encoder_lr


def build_optimizer(model: MultiTaskModel, config: OptimizationConfig, tunings: dict[str, TaskTuning]) -> torch.optim.AdamW:
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        lr = learning_rate(name, model, config, tunings)
        decay = 0.0 if _no_decay(name) else config.weight_decay
        groups.setdefault((lr, decay), []).append(parameter)
    return torch.optim.AdamW(
        [{"params": params, "lr": lr, "weight_decay": decay} for (lr, decay), params in groups.items()]
    )


class ProgressSchedule:
    """Learning-rate schedule over the fraction of training done, so the same curve serves a step budget and a
    wall-clock budget (``max_minutes``: the fraction is training time used / budget).

    ``first_step``: the fraction one step represents (1 / total steps; a small constant under a time budget), so the
    first warm-up step already learns a little instead of running at learning rate 0.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, config: OptimizationConfig, warmup_ratio: float,
                 first_step: float) -> None:
        self.optimizer, self.config = optimizer, config
        self.warmup, self.first_step = warmup_ratio, first_step
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.progress = 0.0
        self.update(0.0)

    def factor(self, progress: float) -> float:
        if progress < self.warmup:
            return min(1.0, (progress + self.first_step) / (self.warmup + self.first_step))
        if self.config.schedule == "constant":
            return 1.0
        decay = min(1.0, (progress - self.warmup) / max(1e-12, 1.0 - self.warmup))
        if self.config.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * decay))
        return max(0.0, 1.0 - decay)

    def update(self, progress: float) -> None:
        """Set every group's learning rate for the next step, ``progress`` of training being done."""
        self.progress = progress
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * self.factor(progress)

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, float]:
        return {"progress": self.progress}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.update(float(state["progress"]))
