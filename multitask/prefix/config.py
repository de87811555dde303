"""Typed settings for prefixes and for how tasks share them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class PrefixConfig:
    length: int = field(default=16, metadata={"help": "Number of virtual tokens prepended to every layer's keys/values."})
    reparameterize: bool = field(
        default=True,
        metadata={"help": "Produce the prefix through embedding -> Linear -> Tanh -> Linear (faster, stabler training)."},
    )
    mlp_hidden_size: int = field(default=512, metadata={"help": "Hidden width of the reparameterisation MLP."})
    dropout: float = field(default=0.1, metadata={"help": "Dropout applied to prefix keys/values while training."})
    init: Literal["normal", "uniform"] = field(default="normal", metadata={"help": "Initialisation of the prefix embedding."})
    init_std: float = field(default=0.02, metadata={"help": "Std (normal) or half-range (uniform) of the initialisation."})

    def __post_init__(self) -> None:
        if self.length < 0:
            raise ValueError(f"length must be >= 0, got {self.length}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.mlp_hidden_size < 1:
            raise ValueError(f"mlp_hidden_size must be >= 1, got {self.mlp_hidden_size}")


PrefixMode = Literal["shared", "per_task", "hybrid", "groups"]


@dataclass
class PrefixBankConfig:
    mode: PrefixMode = field(
        default="per_task",
        metadata={"help": "shared: one prefix for all tasks; per_task: one each; hybrid: shared + per-task "
                  "concatenated; groups: tasks naming the same group share a prefix."},
    )
    prefix: PrefixConfig = field(default_factory=PrefixConfig, metadata={"help": "Default settings of every prefix."})
    shared_length: int | None = field(
        default=None, metadata={"help": "Length of the shared prefix in hybrid mode (default: prefix.length)."}
    )
    group_lengths: dict[str, int] = field(
        default_factory=dict, metadata={"help": "Per-group prefix length overrides (groups mode)."}
    )
