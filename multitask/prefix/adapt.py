"""Fit one prefix's keys/values to another prefix's shape, so a new task can start from any prefix of a model.

A trained prefix is a block of keys/values ``(layers, 2, heads, tokens, head_dim)``. A new task's prefix may have
other layers or another length. Layers are matched by encoder layer index: the keys/values a prefix learned for
layer 3 only make sense in layer 3. A layer the source lacks keeps the new prefix's own start there (``fill``), so
a source in the top 3 layers still starts those layers of an all-layer prefix; with no layer in common there is
nothing to transfer, and that is refused. Tokens are cut (the first ones kept) or repeated in order: attention over
virtual tokens is permutation-invariant, and a repeated token splits attention between copies of one key/value,
which starts the new prefix where the source's distribution of attention over those keys was.
"""

from __future__ import annotations

import torch

from multitask.errors import ConfigError


def adapt_key_values(kv: torch.Tensor, source_layers: tuple[int, ...], target_layers: tuple[int, ...],
                     target_length: int, source_name: str = "source", fill: torch.Tensor | None = None) -> torch.Tensor:
    """``kv`` of a prefix living in ``source_layers``, fitted to ``target_layers`` x ``target_length`` tokens; the
    target's layers the source lacks come from ``fill`` (the target's own keys/values, same shape as the result).

    ConfigError (one line) when the layers have nothing in common, when the target has layers the source lacks and
    there is no ``fill``, or when the source has no tokens."""
    shared = [layer for layer in target_layers if layer in source_layers]
    missing = [layer for layer in target_layers if layer not in source_layers]
    if not shared or (missing and fill is None):
        raise ConfigError(f"prefix {source_name!r} lives in layers {list(source_layers)}, so it cannot start a "
                          f"prefix in layers {list(target_layers)} (no keys/values for layer(s) {missing})")
    length = kv.shape[3]
    if length == 0 and target_length:
        raise ConfigError(f"prefix {source_name!r} has no tokens to start a {target_length}-token prefix from")
    repeats = max(1, -(-target_length // max(length, 1)))  # ceil
    tokens = kv.repeat(1, 1, 1, repeats, 1)[:, :, :, :target_length]
    rows = [tokens[source_layers.index(layer)] if layer in source_layers else fill[index].to(kv.dtype)
            for index, layer in enumerate(target_layers)]
    return torch.stack(rows).clone()
