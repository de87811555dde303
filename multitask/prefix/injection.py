"""Inject prefix keys/values through transformers' attention interface (the robust route on transformers 5.x).

The encoder is loaded with ``attn_implementation`` set to one of the names registered here. Its self-attention
modules then call :func:`_prefix_attention`, which reads the ``prefix_kv`` keyword that :class:`~multitask.model`
passes to the encoder's forward (transformers forwards extra keywords down to the attention function). The
prefix is concatenated in front of the layer's keys/values and the mask is widened by ``P`` positions (``attention:
joint``), or attended in a softmax of its own whose output is added to the layer's (``attention: separate``). The
encoder's own position ids are untouched, so a full-length input still fits, and nothing is cached between
calls, so gradient checkpointing keeps working.
"""

from __future__ import annotations

from typing import Callable

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.models.bert.modeling_bert import eager_attention_forward

from multitask.prefix.bank import LayerPrefix, PrefixInputs

PREFIX_ATTENTION = {"sdpa": "multitask_prefix_sdpa", "eager": "multitask_prefix_eager"}


def _widen_mask(
    mask: torch.Tensor | None, prefix: LayerPrefix, query: torch.Tensor, additive: bool
) -> torch.Tensor | None:
    """Allow each query to see its example's visible prefix positions in front of the original keys.

    ``additive``: the attention kernel adds the mask to its scores (eager), so a mask built here must be a float
    mask of 0 / -inf, never a bool one (which would be added as 0 / 1 and leave masked prefix slots visible).
    """
    if mask is None and prefix.fully_visible:
        return None
    batch, q_len = query.shape[0], query.shape[2]
    visible = prefix.mask[:, None, None, :]  # (B, 1, 1, P)
    if mask is None:  # self-attention without padding: every key of the input is visible
        if additive:
            mask = torch.zeros(batch, 1, q_len, q_len, dtype=query.dtype, device=query.device)
        else:
            mask = torch.ones(batch, 1, q_len, q_len, dtype=torch.bool, device=query.device)
    if mask.dtype == torch.bool:
        visible = visible.expand(batch, 1, mask.shape[2], -1)
        return torch.cat([visible, mask.expand(batch, -1, -1, -1)], dim=-1)
    blocked = torch.finfo(mask.dtype).min
    prefix_part = torch.zeros_like(visible, dtype=mask.dtype).masked_fill(~visible, blocked)
    prefix_part = prefix_part.expand(batch, 1, mask.shape[2], -1)
    return torch.cat([prefix_part, mask.expand(batch, -1, -1, -1)], dim=-1)


def _widened_once(
    prefix_kv: PrefixInputs, mask: torch.Tensor | None, prefix: LayerPrefix, query: torch.Tensor, additive: bool
) -> torch.Tensor | None:
    """``_widen_mask``, built once per forward pass for all the layers that see the same prefix positions (every
    layer, where prefixes span them all) instead of once per layer. The layers share one padding mask object,
    which the cache holds (so its id cannot be reused) and checks."""
    key = (prefix.mask_key, id(mask), additive, query.shape[2], query.dtype)
    hit = prefix_kv.widened.get(key)
    if hit is not None and hit[0] is mask:
        return hit[1]
    widened = _widen_mask(mask, prefix, query, additive)
    prefix_kv.widened[key] = (mask, widened)
    return widened


def _separate_prefix_attention(
    module, query: torch.Tensor, prefix: LayerPrefix, scaling: float | None = None, dropout: float = 0.0, **_
) -> torch.Tensor:
    """The queries' attention over the prefix alone, ``(batch, q_len, heads, head_dim)`` like the kernels' output.

    Its own softmax, so the prefix adds to what the real tokens give instead of taking attention from them; an
    example whose task has no prefix here gets zeros (its softmax would have no visible key).
    """
    scale = scaling if scaling is not None else module.scaling
    scores = torch.matmul(query, prefix.keys.to(query.dtype).transpose(-1, -2)) * scale  # (B, H, q_len, P)
    visible = prefix.mask[:, None, None, :]
    if not prefix.fully_visible:
        scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if not prefix.fully_visible:
        weights = weights * visible.any(dim=-1, keepdim=True)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, prefix.values.to(query.dtype)).transpose(1, 2)


def _with_prefix(base: Callable, additive_mask: bool) -> Callable:
    def attention(
        module, query, key, value, attention_mask, prefix_kv: PrefixInputs | None = None,
        kv_sink: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None, **kwargs,
    ):
        if kv_sink is not None:  # the layer's own keys/values of real tokens (prefix initialisation reads them)
            kv_sink[module.layer_idx] = (key.detach(), value.detach())
        # None: no task of the batch has a prefix attended that way in this layer
        joint, separate = prefix_kv.layer(module.layer_idx) if prefix_kv is not None else (None, None)
        if joint is not None:
            key = torch.cat([joint.keys.to(key.dtype), key], dim=2)
            value = torch.cat([joint.values.to(value.dtype), value], dim=2)
            attention_mask = _widened_once(prefix_kv, attention_mask, joint, query, additive_mask)
        output, weights = base(module, query, key, value, attention_mask, **kwargs)
        if separate is not None:
            output = output + _separate_prefix_attention(module, query, separate, **kwargs)
        return output, weights

    return attention


# Devices whose padding masks are never read back to decide whether to skip them (reading costs a wait there).
NO_READ_BACK_DEVICES = ("cuda",)


def _mask_without_read_back(build: Callable) -> Callable:
    """A mask builder that, for a padding mask on a GPU, never asks the device whether the mask can be skipped
    (transformers would read ``mask.all()`` back in every forward): the model passes no mask at all for a batch
    it knows on the host to be unpadded (``ModelInputs.encoder_mask``). Elsewhere the builder is unchanged."""
    def mask(*args, attention_mask: torch.Tensor | None = None, **kwargs):
        if attention_mask is not None and attention_mask.device.type in NO_READ_BACK_DEVICES:
            kwargs["allow_is_bidirectional_skip"] = False
        return build(*args, attention_mask=attention_mask, **kwargs)

    return mask


def register_prefix_attention() -> None:
    """Idempotently register the prefix-aware attention functions and their mask builders."""
    AttentionInterface.register(PREFIX_ATTENTION["sdpa"], _with_prefix(sdpa_attention_forward, additive_mask=False))
    AttentionInterface.register(PREFIX_ATTENTION["eager"], _with_prefix(eager_attention_forward, additive_mask=True))
    AttentionMaskInterface.register(PREFIX_ATTENTION["sdpa"], _mask_without_read_back(sdpa_mask))
    AttentionMaskInterface.register(PREFIX_ATTENTION["eager"], _mask_without_read_back(eager_mask))


register_prefix_attention()
