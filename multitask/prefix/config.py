"""Typed settings for prefixes and for how tasks share them."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from multitask.errors import ConfigError

PrefixAttention = Literal["joint", "separate"]


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
    layers: Literal["all"] | dict[str, int] | list[int] = field(
        default="all",
        metadata={"help": "Attention layers that get this prefix: all, {top: k}, {bottom: k} or a list of layer "
                  "indices (0 = the lowest). Layers below every trainable prefix need no backward pass, and with "
                  "optimization.frozen_cache their output is computed once."},
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
        check_layers(self.layers)
        if self.mlp_hidden_size < 1:
            raise ValueError(f"mlp_hidden_size must be >= 1, got {self.mlp_hidden_size}")


def check_layers(spec: Any) -> None:
    """What can be checked without the encoder: the form of a ``layers`` setting."""
    if isinstance(spec, dict):
        if len(spec) != 1 or next(iter(spec)) not in ("top", "bottom"):
            raise ValueError(f"layers: expected all, {{top: k}}, {{bottom: k}} or a list of indices, got {spec}")
        if next(iter(spec.values())) < 1:
            raise ValueError(f"layers: k must be >= 1, got {spec}")
    elif isinstance(spec, list):
        if not spec or len(set(spec)) != len(spec) or min(spec) < 0:
            raise ValueError(f"layers: expected distinct layer indices >= 0, got {spec}")


def resolve_layers(spec: Any, num_layers: int) -> tuple[int, ...]:
    """The sorted layer indices a ``layers`` setting names on an encoder of ``num_layers`` layers."""
    check_layers(spec)
    if spec == "all":
        return tuple(range(num_layers))
    if isinstance(spec, dict):
        (side, k), = spec.items()
        if k > num_layers:
            raise ConfigError(f"prefix layers {{{side}: {k}}}: the encoder has only {num_layers} layers")
        return tuple(range(num_layers - k, num_layers)) if side == "top" else tuple(range(k))
    if max(spec) >= num_layers:
        raise ConfigError(f"prefix layers {spec}: layer {max(spec)} does not exist (the encoder has layers "
                          f"0..{num_layers - 1})")
    return tuple(sorted(spec))


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
    shared_layers: Literal["all"] | dict[str, int] | list[int] | None = field(
        default=None, metadata={"help": "Layers of the shared prefix (shared, hybrid; default: prefix.layers), e.g. "
                                        "all, with task prefixes in {top: 2}."}
    )
    group_lengths: dict[str, int] = field(
        default_factory=dict, metadata={"help": "Per-group prefix length overrides (groups mode)."}
    )
    init_from: str | None = field(
        default=None,
        metadata={"help": "A finished run directory: prefixes of the same name (shared, task_<name>, group_<name>) "
                  "and heads of the same task start from its trained weights (same encoder, lengths and layers)."},
    )
    freeze: list[str] = field(
        default_factory=list,
        metadata={"help": "Prefixes that do not train (e.g. [shared] after init_from: a multi-task shared base with "
                  "task prefixes trained on top). Frozen prefixes are saved with the run."},
    )
    attention: PrefixAttention | None = field(
        default=None,
        metadata={"help": "How the real tokens attend to the prefixes. joint: one softmax over prefix and real keys "
                  "(P-Tuning v2). separate: the prefix in a softmax of its own whose output is added to the "
                  "tokens' attention, so it takes no attention away from the real tokens; its values start at "
                  "zero, so training starts from the frozen encoder's own output (LLaMA-Adapter's zero-init "
                  "attention). Unset: each task type's default (separate for ner and qa, joint otherwise; "
                  "docs/tuning.md); a task file's prefix.attention overrides it for that task."},
    )

    transfer: str = field(
        default="none",
        metadata={"help": "With base (growing a model): how each new task's own prefix starts. none: as a new "
                  "prefix does (init); a prefix name of the base (task_conll2003, shared, group_x): its trained "
                  "keys/values, fitted to the new prefix's length and layers; auto: every base prefix and none are "
                  "each scored on the task's training data (transfer_criterion), and the best wins (never the "
                  "validation split); "
                  "mixture: a fresh prefix plus a learned, input-dependent mix of every base prefix (frozen), as "
                  "ATTEMPT does, its mixing weights reported. A task file's prefix.transfer overrides it for that "
                  "task."},
    )
    transfer_steps: int = field(
        default=60, metadata={"help": "transfer: auto with transfer_criterion metric or loss: optimiser steps each "
                              "candidate trains before it is scored."}
    )
    transfer_folds: int | None = field(
        default=None,
        metadata={"help": "transfer: auto with transfer_criterion metric or loss: how many disjoint held-back slices "
                  "of the training examples score each candidate; its score is the mean over them. Each slice is "
                  "20% of the examples or enough for the "
                  "slices to hold back 100 in all, at most half of them and 256; each costs transfer_steps steps "
                  "per candidate. Unset: 2 folds below 500 examples (two of 50 for 100 examples: one slice of 20 "
                  "is too noisy a judge), 1 from 500."},
    )
    transfer_criterion: str = field(
        default="evidence",
        metadata={"help": "transfer: auto: what scores a candidate, on the training examples only. evidence: no "
                  "training; the log evidence (LogME) of a linear head from the features the candidate gives to "
                  "the labels, one forward pass over the examples per candidate. metric: a trial of "
                  "transfer_steps, then the task's main metric (accuracy, entity F1, ...) on held-back examples, "
                  "ties broken by loss; loss: such a trial's held-back loss alone (no decoding)."},
    )
    transfer_prior: str = field(
        default="same_type",
        metadata={"help": "transfer: auto with transfer_criterion evidence or metric: what the scores are weighed "
                  "against. "
                  "same_type: a base prefix that serves only tasks of the new task's type (CoNLL-2003's for a new "
                  "ner task) is taken over the best-scored candidate when it is credible: by the evidence, it scores "
                  "above a fresh start; by trials, they cannot tell it is worse (it matched the best in 20% or more "
                  "of the paired resamples) or it clearly beats a fresh start (in 80% or more). Both scores tell a "
                  "helpful start from a harmful one better than they rank close sources (docs/growing.md). none: "
                  "the best-scored candidate alone."},
    )

    def __post_init__(self) -> None:
        if self.shared_layers is not None:
            check_layers(self.shared_layers)
        check_transfer(self.transfer)
        if self.transfer_steps < 1:
            raise ValueError(f"transfer_steps must be >= 1, got {self.transfer_steps}")
        if self.transfer_folds is not None and self.transfer_folds < 1:
            raise ValueError(f"transfer_folds must be >= 1, got {self.transfer_folds}")
        if self.transfer_criterion not in TRANSFER_CRITERIA:
            raise ValueError(f"transfer_criterion: expected one of {', '.join(TRANSFER_CRITERIA)}, got "
                             f"{self.transfer_criterion!r}")
        if self.transfer_prior not in TRANSFER_PRIORS:
            raise ValueError(f"transfer_prior: expected one of {', '.join(TRANSFER_PRIORS)}, got "
                             f"{self.transfer_prior!r}")


TRANSFER_CHOICES = ("none", "auto", "mixture")
TRANSFER_CRITERIA = ("evidence", "metric", "loss")
TRANSFER_PRIORS = ("same_type", "none")


def check_transfer(value: str) -> None:
    """What can be checked without the base run: a choice or a prefix name of the bank's form."""
    if value not in TRANSFER_CHOICES and not re.match(r"^[A-Za-z0-9_\-]+$", value):
        raise ValueError(f"transfer: expected none, auto, mixture or a prefix name of the base run, got {value!r}")
