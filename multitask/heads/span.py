"""Span head: start and end logits per token (extractive QA)."""

from __future__ import annotations

import torch
from torch import nn

from multitask.heads.base import HEADS, EncoderOutput, HeadConfig, output_layers


class SpanHead(nn.Module):
    def __init__(self, config: HeadConfig, hidden_size: int, num_outputs: int = 2) -> None:
        super().__init__()
        self.layers = output_layers(config, hidden_size, 2)

    def forward(self, encoded: EncoderOutput) -> torch.Tensor:
        """Logits of shape (batch, length, 2): [..., 0] start, [..., 1] end."""
        return self.layers(encoded.hidden_states)


HEADS.register("span", SpanHead)
