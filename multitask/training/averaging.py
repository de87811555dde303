"""An exponential moving average of the trained weights (Polyak averaging), evaluated and saved in their place.

With a few hundred training examples a prefix's validation score swings by several points between evaluations
(a high learning rate on a small set), and early stopping keeps whichever evaluation happened to land on a peak,
or stops on a dip. The average of the recent weights sits in the middle of those swings. Only the trainable
weights are averaged (prefixes, heads, LoRA branches), so for a prefix it costs a copy of a few hundred thousand
numbers.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn


class WeightAverage:
    """Running average ``shadow = d * shadow + (1 - d) * weight`` after every optimiser step.

    The decay ramps up as ``min(decay, (1 + n) / (10 + n))`` over the first ``n`` updates (TensorFlow's
    ``num_updates``), so the average of a young run is not dominated by its random initial weights.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.shadow = {name: p.detach().clone() for name, p in self.parameters.items()}
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        weight = 1.0 - self.current_decay()
        for name, parameter in self.parameters.items():
            self.shadow[name].lerp_(parameter.detach(), weight)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for name, parameter in self.parameters.items():
            parameter.copy_(self.shadow[name])

    @contextmanager
    @torch.no_grad()
    def applied(self) -> Iterator[None]:
        """The averaged weights in the model for the block (evaluation, saving), the trained ones restored after."""
        trained = {name: p.detach().clone() for name, p in self.parameters.items()}
        self.copy_to_model()
        try:
            yield
        finally:
            for name, parameter in self.parameters.items():
                parameter.copy_(trained[name])

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "shadow": {k: v.detach().cpu().clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = state["updates"]
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)
