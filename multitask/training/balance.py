"""Task-balanced gradients on prefixes several tasks share.

Each training step is one task's batch, and Adam keeps one running mean and one running second moment per
parameter. On a prefix every task shares, a task whose gradients are larger (QA's span loss over hundreds of
positions against a sentence label) then owns both: the others' updates shrink by the ratio of the norms, and the
shared prefix trains mostly for that task. ``optimization.balance_shared`` rescales each step's gradient on the
shared prefixes to the tasks' common gradient scale: the mean, over tasks, of a running average of each task's
own gradient norm there; ``balance_strength`` below 1 moves each task only part of the way (on a log scale). Task
prefixes and heads, which one task alone trains, are left as they are.
"""

from __future__ import annotations

import math
from typing import Any

import torch

# Weight of the running average's past: ~10 of a task's own steps.
MOMENTUM = 0.9


class SharedGradientBalancer:
    """Rescales the gradient on ``parameters`` (shared by several tasks) after each task's backward pass."""

    def __init__(self, parameters: list[torch.nn.Parameter], strength: float = 1.0) -> None:
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"balance strength must be in [0, 1], got {strength}")
        self.parameters = parameters
        self.strength = strength
        self.norms: dict[str, float] = {}  # per task: running average of its gradient norm on the shared prefixes

    @torch.no_grad()
    def __call__(self, task: str) -> float:
        """Balance the current (unscaled) gradients, which come from ``task``; returns the factor applied."""
        grads = [p.grad for p in self.parameters if p.grad is not None]
        if not grads:
            return 1.0
        # One read-back for all parameters (not one per parameter, each a wait for the device), then the same
        # double-precision sum in the same order as before.
        squares = torch.stack([g.float().pow(2).sum() for g in grads]).tolist()
        norm = math.sqrt(sum(squares))
        if not math.isfinite(norm) or norm == 0.0:  # an overflowed fp16 step is skipped by the scaler anyway
            return 1.0
        previous = self.norms.get(task)
        self.norms[task] = norm if previous is None else MOMENTUM * previous + (1 - MOMENTUM) * norm
        factor = ((sum(self.norms.values()) / len(self.norms)) / self.norms[task]) ** self.strength
        for grad in grads:
            grad.mul_(factor)
        return factor

    def state_dict(self) -> dict[str, Any]:
        return {"norms": dict(self.norms)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.norms = {str(task): float(norm) for task, norm in state.get("norms", {}).items()}
