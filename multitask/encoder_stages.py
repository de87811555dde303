"""Run a BERT-family encoder in two stages: the layers below a boundary, then the layers from it up.

When the prefixes live only in the upper layers (``layers: {top: k}``), the lower layers' output for an input does not
depend on anything trained: it can be computed once and reused (the frozen-layer cache in training), or once for
several tasks analysing the same text (inference). Running the stages back to back equals the encoder's own forward:
the same embeddings (ELECTRA's projection included), the same attention mask builder, the same layers.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask

from multitask.errors import UnsupportedModelError
from multitask.prefix.bank import PrefixInputs


def encoder_layers(encoder: PreTrainedModel) -> torch.nn.ModuleList:
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if not isinstance(layers, torch.nn.ModuleList) or getattr(encoder, "embeddings", None) is None:
        raise UnsupportedModelError(f"{type(encoder).__name__}: cannot run its layers in stages (expected "
                                    f"embeddings and encoder.layer, as BERT, RoBERTa, XLM-R and ELECTRA have)")
    return layers


def embed(encoder: PreTrainedModel, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
    """The hidden states entering layer 0."""
    extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
    hidden = encoder.embeddings(input_ids=input_ids, **extra)
    project = getattr(encoder, "embeddings_project", None)  # ELECTRA: embedding size -> hidden size
    return project(hidden) if project is not None else hidden


def run_layers(
    encoder: PreTrainedModel, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int, stop: int,
    prefix_kv: PrefixInputs | None = None,
) -> torch.Tensor:
    """Layers ``start`` .. ``stop - 1`` on ``hidden`` (batch, tokens, hidden); ``attention_mask`` is the 2-D padding
    mask. Layers without a prefix in ``prefix_kv`` attend as the plain encoder does."""
    mask = create_bidirectional_mask(config=encoder.config, inputs_embeds=hidden, attention_mask=attention_mask)
    extra = {} if prefix_kv is None else {"prefix_kv": prefix_kv}
    for layer in encoder_layers(encoder)[start:stop]:
        hidden = layer(hidden, mask, None, **extra)
    return hidden


def lower_states(
    encoder: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
    token_type_ids: torch.Tensor | None, boundary: int, prefix_kv: PrefixInputs | None = None,
) -> torch.Tensor:
    """The hidden states entering layer ``boundary`` (the embeddings when it is 0)."""
    hidden = embed(encoder, input_ids, token_type_ids)
    return run_layers(encoder, hidden, attention_mask, 0, boundary, prefix_kv) if boundary else hidden


def upper_output(
    encoder: PreTrainedModel, hidden: torch.Tensor, attention_mask: torch.Tensor, boundary: int,
    prefix_kv: PrefixInputs | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The last hidden states (and the pooler's output, where the encoder has one) from the states entering
    layer ``boundary``."""
    last = run_layers(encoder, hidden, attention_mask, boundary, len(encoder_layers(encoder)), prefix_kv)
    pooler = getattr(encoder, "pooler", None)
    return last, pooler(last) if pooler is not None else None


def pad_states(states: list[torch.Tensor], length: int) -> torch.Tensor:
    """``(batch, length, hidden)``: each input's states at the front of its row, zeros where it is padded."""
    padded = states[0].new_zeros((len(states), length, states[0].shape[-1]))
    for row, state in enumerate(states):
        padded[row, : state.shape[0]] = state
    return padded
