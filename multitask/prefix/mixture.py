"""An input-dependent mixture of frozen source prefixes added to a new task's own prefix (ATTEMPT, Asai et al. 2022).

A new task may draw on several of a model's trained prefixes at once, and on different ones for different inputs
(a question about a disease may want the biomedical tagger's prefix, one about a film the sentiment one). For each
input, a small trainable network scores the sources against a summary of the input; the softmax of those scores
weighs the sources' keys/values, which are added to the task's own prefix:

    prefix(x) = own + sum_j a_j(x) * source_j,   a(x) = softmax_j(query(x) . key_j)

where ``query(x)`` comes from the mean of the input's frozen word embeddings (no extra encoder pass), and ``key_j``
from the mean of source ``j``'s keys. Entry 0 is "no source", with a learned key of its own, so the task can ignore
the sources wherever they do not help. The sources' keys/values are fitted to the own prefix's shape once
(:mod:`multitask.prefix.adapt`) and kept as buffers: frozen, and saved with the run, so it needs no other file.
"""

from __future__ import annotations

import torch
from torch import nn

# Width of the query network's bottleneck (ATTEMPT: a down/up projection of the input's pooled embedding).
MIXTURE_RANK = 32


class PrefixMixture(nn.Module):
    """Per-example mixing weights over ``len(sources)`` frozen source prefixes, and their weighted sum."""

    def __init__(self, sources: list[str], kv_shape: tuple[int, ...], hidden_size: int,
                 rank: int = MIXTURE_RANK) -> None:
        super().__init__()
        self.sources = list(sources)
        self.register_buffer("source_kv", torch.zeros(len(sources), *kv_shape))  # (S, layers, 2, heads, P, hd)
        self.down = nn.Linear(hidden_size, rank)
        self.up = nn.Linear(rank, hidden_size)
        self.no_source_key = nn.Parameter(torch.zeros(hidden_size))
        # A zero query scores every entry alike: training starts from an even mix, the same for every input.
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def source_keys(self) -> torch.Tensor:
        """One unit-length key per source, ``(S, hidden)``: the direction of its mean key over layers and tokens,
        heads side by side (unit length, so no source wins by the scale of its keys alone)."""
        keys = self.source_kv[:, :, 0]  # (S, layers, heads, P, hd)
        return nn.functional.normalize(keys.mean(dim=(1, 3)).flatten(1), dim=-1)

    def weights(self, summary: torch.Tensor) -> torch.Tensor:
        """Mixing weights ``(B, 1 + S)`` for inputs summarised as ``(B, hidden)``; column 0 is "no source"."""
        query = self.up(nn.functional.silu(self.down(summary)))
        keys = torch.cat([self.no_source_key[None], self.source_keys().to(query.dtype)])
        return torch.softmax(query @ keys.T, dim=-1)

    def forward(self, summary: torch.Tensor) -> torch.Tensor:
        """The weighted sum of the sources' keys/values for each input: ``(B, layers, 2, heads, P, hd)``."""
        mix = self.weights(summary)[:, 1:]
        return torch.einsum("bs,slkhpd->blkhpd", mix, self.source_kv.to(mix.dtype))


def input_summary(embeddings: nn.Embedding, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The mean of each input's frozen word embeddings over its real tokens: ``(B, hidden)``."""
    with torch.no_grad():
        vectors = embeddings(input_ids)
    mask = attention_mask[..., None].to(vectors.dtype)
    return (vectors * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
