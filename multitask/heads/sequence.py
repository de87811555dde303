"""Sequence head: one vector per example (classification, multi-label, regression)."""

from __future__ import annotations

import torch
from torch import nn

from multitask.errors import ConfigError
from multitask.heads.base import HEADS, EncoderOutput, HeadConfig, output_layers


class SequenceHead(nn.Module):
    def __init__(self, config: HeadConfig, hidden_size: int, num_outputs: int) -> None:
        super().__init__()
        self.pooling = config.pooling
        self.layers = output_layers(config, hidden_size, num_outputs)

    def pool(self, encoded: EncoderOutput) -> torch.Tensor:
        if self.pooling == "pooler":
            if encoded.pooled is None:
                raise ConfigError("pooling 'pooler' needs an encoder loaded with its pooler layer (load_encoder(..., "
                                  "with_pooler=True)); or use pooling 'cls' or 'mean'")
            return encoded.pooled
        if self.pooling == "mean":
            weights = encoded.attention_mask.unsqueeze(-1).to(encoded.hidden_states.dtype)
            return (encoded.hidden_states * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return encoded.hidden_states[:, 0]

    def forward(self, encoded: EncoderOutput) -> torch.Tensor:
        return self.layers(self.pool(encoded))


HEADS.register("sequence", SequenceHead)
