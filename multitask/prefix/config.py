"""Typed settings for prefixes and for how tasks share them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class PrefixConfig:
    length: int | None = field(
        default=None,
        metadata={"help": "Number of virtual tokens prepended to every layer's keys/values (unset: the task type's "
                  "default; see docs/tuning.md)."},
    )
    reparameterize: bool | None = field(
        default=None,
        metadata={"help": "Produce the prefix through embedding -> Linear -> Tanh -> Linear (unset: the task type's "
                  "default)."},
    )
    mlp_hidden_size: int = field(default=512, metadata={"help": "Hidden width of the reparameterisation MLP."})
    dropout: float | None = field(
        default=None, metadata={"help": "Dropout on prefix keys/values while training (unset: the task type's default)."}
    )
    init: Literal["normal", "uniform", "vocab"] = field(
        default="normal",
        metadata={"help": "Initial keys/values: normal or uniform random at the scale init_std, or vocab: the frozen "
                  "encoder's own keys/values of real tokens (init_words, else the training data's most frequent "
                  "tokens), as Li & Liang initialise prefixes from activations of real words."},
    )
    init_std: float | None = field(
        default=None,
        metadata={"help": "Std of the initial keys/values (normal, uniform). Unset: the encoder's own key/value std, "
                  "measured per layer on real tokens (keys and values separately)."},
    )
    init_words: list[str] = field(
        default_factory=list,
        metadata={"help": "init: vocab: words whose activations start the virtual tokens, in order; the rest (if "
                  "fewer tokens than the prefix length) are the training data's most frequent tokens."},
    )

    def __post_init__(self) -> None:
        if self.length is not None and self.length < 0:
            raise ValueError(f"length must be >= 0, got {self.length}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.init_std is not None and self.init_std <= 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std}")
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
