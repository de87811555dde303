"""Encoder-aware prefix initialisation: real key/value scales, and activations of real words (``init: vocab``).

A prefix initialised far from the encoder's own key/value scale either drowns the real tokens (too large) or is
ignored for many steps (N(0, 0.02): DESIGN.md measured PEFT's N(0, 1) start 2 F1 ahead). So every prefix starts
from the frozen encoder's own keys/values of real tokens: their per-layer std (normal, uniform) or the
activations themselves (vocab).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Iterable, Sequence

import torch

from multitask.prefix.bank import PrefixBank
from multitask.prefix.encoder import PrefixEncoder, random_key_values

log = logging.getLogger(__name__)
# Tokens taken from the training data to measure the encoder's key/value scale.
SCALE_SAMPLE_TOKENS = 64


@torch.no_grad()
def real_key_values(encoder: torch.nn.Module, token_ids: Sequence[int], cls_id: int | None, sep_id: int | None) -> torch.Tensor:
    """The frozen encoder's keys/values of ``token_ids`` read as one sentence: ``(layers, 2, heads, n, head_dim)``."""
    ids = [*([cls_id] if cls_id is not None else []), *token_ids, *([sep_id] if sep_id is not None else [])]
    start = 1 if cls_id is not None else 0
    device = next(encoder.parameters()).device
    sink: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    was_training = encoder.training
    encoder.eval()  # no dropout: the activations a frozen encoder gives at inference
    try:
        encoder(input_ids=torch.tensor([ids], device=device), kv_sink=sink)
    finally:
        encoder.train(was_training)
    layers = [torch.stack([sink[i][0][0], sink[i][1][0]]) for i in sorted(sink)]  # each (2, heads, n_all, head_dim)
    return torch.stack(layers)[:, :, :, start : start + len(token_ids)].float().cpu()


def key_value_scale(reference: torch.Tensor) -> torch.Tensor:
    """Std of the keys and of the values in each layer: ``(layers, 2, 1, 1, 1)``, broadcastable over a prefix."""
    return reference.flatten(2).std(dim=-1)[:, :, None, None, None]


def mean_pairwise_cosine(kv: torch.Tensor) -> float:
    """Mean cosine similarity between the virtual tokens of ``(layers, 2, heads, P, head_dim)`` keys/values, each
    token's vector being all its layers' keys and values (0: unrelated directions; 1: one token repeated)."""
    length = kv.shape[3]
    if length < 2:
        return 0.0
    tokens = torch.nn.functional.normalize(kv.permute(3, 0, 1, 2, 4).reshape(length, -1).float(), dim=-1)
    similarity = tokens @ tokens.T
    return float((similarity.sum() - similarity.diagonal().sum()) / (length * (length - 1)))


def frequent_tokens(sequences: Iterable[Sequence[int]], exclude: set[int], count: int) -> list[int]:
    """The ``count`` most frequent token ids of ``sequences`` (ties by id), special tokens excluded."""
    counts = Counter(token for sequence in sequences for token in sequence if token not in exclude)
    return [token for token, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:count]]


def word_tokens(words: Sequence[str], tokenizer) -> list[int]:
    """The word pieces of the user's ``init_words``, in order (a word may give several virtual tokens)."""
    return [token for word in words for token in tokenizer(word, add_special_tokens=False)["input_ids"]]


def initial_key_values(prefix: PrefixEncoder, reference: torch.Tensor, words: list[int], encoder, ids: tuple) -> torch.Tensor:
    config = prefix.config
    if config.init == "vocab":
        chosen = words[: prefix.length]
        return real_key_values(encoder, chosen, *ids)[list(prefix.layers)] if chosen else reference[:, :, :, :0]
    scale = config.init_std if config.init_std is not None else key_value_scale(reference)
    return random_key_values(config, prefix.kv_shape, scale)


def initialize_prefixes(
    bank: PrefixBank, encoder: torch.nn.Module, tokenizer, task_sequences: dict[str, Sequence[Sequence[int]]],
    names: Iterable[str] | None = None,
) -> dict[str, float]:
    """Set every prefix of ``bank`` (or only those ``names``: a grown model's new ones) to its configured
    initialisation, measured on this encoder.

    ``task_sequences``: token ids of each task's training inputs (the frequent-token pool of a prefix is drawn from
    the tasks that use it). Returns the mean pairwise cosine similarity of each prefix's initial virtual tokens.
    """
    special = set(tokenizer.all_special_ids)
    ids = (tokenizer.cls_token_id, tokenizer.sep_token_id)
    chosen = set(bank.encoders if names is None else names)
    similarity = {}
    for name, prefix in bank.encoders.items():
        if prefix.length == 0 or name not in chosen:
            continue
        users = [task for task, names in bank.layout.task_prefixes.items() if name in names]
        sequences = [seq for task in users for seq in task_sequences.get(task, [])]
        pool = frequent_tokens(sequences, special, max(prefix.length, SCALE_SAMPLE_TOKENS))
        words = list(dict.fromkeys(word_tokens(prefix.config.init_words, tokenizer) + pool))  # no token twice
        reference = real_key_values(encoder, pool[:SCALE_SAMPLE_TOKENS] or words[:1] or [0], *ids)
        reference = reference[list(prefix.layers)]  # the layers this prefix lives in
        kv = initial_key_values(prefix, reference, words, encoder, ids)
        if kv.shape[3] < prefix.length:  # vocab with too few distinct tokens: random ones at the real scale
            extra = random_key_values(prefix.config, (*kv.shape[:3], prefix.length - kv.shape[3], kv.shape[4]),
                                      key_value_scale(reference))
            kv = torch.cat([kv, extra], dim=3)
        if bank.layout.attention_of(name) == "separate":  # zero values: the encoder's own output until the prefix learns
            kv = kv.clone()
            kv[:, 1] = 0.0
        prefix.set_initial(kv)
        similarity[name] = mean_pairwise_cosine(prefix().detach())
        log.info("prefix %s: init %s, %d tokens, mean pairwise cosine of initial tokens %.3f",
                 name, prefix.config.init, prefix.length, similarity[name])
    return similarity
