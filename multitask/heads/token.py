"""Token head: one vector per token (NER and other tagging)."""

from __future__ import annotations

import torch
from torch import nn

from multitask.heads.base import HEADS, EncoderOutput, HeadConfig, output_layers


class TokenHead(nn.Module):
    def __init__(self, config: HeadConfig, hidden_size: int, num_outputs: int) -> None:
        super().__init__()
        self.layers = output_layers(config, hidden_size, num_outputs)

    def forward(self, encoded: EncoderOutput) -> torch.Tensor:
        return self.layers(encoded.hidden_states)


HEADS.register("token", TokenHead)
