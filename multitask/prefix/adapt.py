"""Fit one prefix's keys/values to another prefix's shape, so a new task can start from any prefix of a model.

A trained prefix is a block of keys/values ``(layers, 2, heads, tokens, head_dim)``. A new task's prefix may have
other layers or another length. Layers are matched by encoder layer index: the keys/values a prefix learned for
layer 3 only make sense in layer 3, so a layer the source lacks cannot be filled and is refused. Tokens are cut
(the first ones kept) or repeated in order: attention over virtual tokens is permutation-invariant, and a repeated
token splits attention between copies of one key/value, which starts the new prefix where the source's
distribution of attention over those keys was.
"""

from __future__ import annotations

import torch

from multitask.errors import ConfigError


def adapt_key_values(kv: torch.Tensor, source_layers: tuple[int, ...], target_layers: tuple[int, ...],
                     target_length: int, source_name: str = "source") -> torch.Tensor:
    """``kv`` of a prefix living in ``source_layers``, fitted to ``target_layers`` x ``target_length`` tokens.

    ConfigError (one line) when the target has a layer the source lacks or the source has no tokens."""
    missing = [layer for layer in target_layers if layer not in source_layers]
    if missing:
        raise ConfigError(f"prefix {source_name!r} lives in layers {list(source_layers)}, so it cannot start a "
                          f"prefix in layers {list(target_layers)} (no keys/values for layer(s) {missing})")
    length = kv.shape[3]
    if length == 0 and target_length:
        raise ConfigError(f"prefix {source_name!r} has no tokens to start a {target_length}-token prefix from")
    rows = kv[[source_layers.index(layer) for layer in target_layers]]
    if target_length <= length:
        return rows[:, :, :, :target_length].clone()
    repeats = -(-target_length // length)  # ceil
    return rows.repeat(1, 1, 1, repeats, 1)[:, :, :, :target_length].clone()
