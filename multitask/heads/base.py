"""What every head receives and the settings a task YAML may give its head."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from multitask.registry import Registry

HEADS: Registry = Registry("head")


@dataclass
class EncoderOutput:
    hidden_states: torch.Tensor  # (batch, length, hidden)
    attention_mask: torch.Tensor  # (batch, length)
    pooled: torch.Tensor | None  # the encoder's pooler output, when it has one


@dataclass
class HeadConfig:
    pooling: Literal["cls", "pooler", "mean"] = field(
        default="cls", metadata={"help": "Sentence representation for sequence heads: first token, pooler, or mean."}
    )
    dropout: float = field(default=0.1, metadata={"help": "Dropout before the output layer."})
    hidden_size: int | None = field(
        default=None, metadata={"help": "Add one Tanh hidden layer of this width before the output layer."}
    )
    lr: float | None = field(default=None, metadata={"help": "Learning rate of this head (default: the task type's)."})
    transfer_from: str | None = field(
        default=None,
        metadata={"help": "Growing a model (experiment base:): start this head from the base task of that name, "
                  "which must have the same type, labels and head settings (e.g. a second sentiment dataset)."},
    )


def output_layers(config: HeadConfig, in_features: int, out_features: int) -> torch.nn.Sequential:
    """Dropout, an optional Tanh hidden layer, and the output projection: shared by every head kind."""
    layers: list[torch.nn.Module] = [torch.nn.Dropout(config.dropout)]
    if config.hidden_size:
        layers += [torch.nn.Linear(in_features, config.hidden_size), torch.nn.Tanh(), torch.nn.Dropout(config.dropout)]
        in_features = config.hidden_size
    layers.append(torch.nn.Linear(in_features, out_features))
    return torch.nn.Sequential(*layers)
