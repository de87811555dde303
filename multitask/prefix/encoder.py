"""Prefix encoders: produce per-layer prefix keys/values, either directly or through an MLP."""

from __future__ import annotations

import torch
from torch import nn

from multitask.prefix.config import PrefixConfig


class PrefixEncoder(nn.Module):
    """Learned keys/values for ``length`` virtual tokens in every attention layer.

    Output shape: ``(num_layers, 2, num_heads, length, head_dim)`` where index 0/1 of dim 1 is key/value.
    With ``reparameterize`` the values come from a small MLP over a prefix embedding (P-Tuning v2's
    reparameterisation); :meth:`fold` evaluates the MLP once and returns an equivalent flat encoder.
    """

    def __init__(self, config: PrefixConfig, num_layers: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.config = config
        self.num_layers, self.num_heads, self.head_dim = num_layers, num_heads, head_dim
        self.length = config.length
        out_dim = num_layers * 2 * num_heads * head_dim
        if config.reparameterize:
            hidden = num_heads * head_dim
            self.embedding = nn.Parameter(torch.empty(config.length, hidden))
            self.mlp = nn.Sequential(
                nn.Linear(hidden, config.mlp_hidden_size), nn.Tanh(), nn.Linear(config.mlp_hidden_size, out_dim)
            )
        else:
            self.embedding = nn.Parameter(torch.empty(config.length, out_dim))
            self.mlp = None
        self._init_embedding()

    def _init_embedding(self) -> None:
        if self.config.init == "normal":
            nn.init.normal_(self.embedding, std=self.config.init_std)
        else:
            nn.init.uniform_(self.embedding, -self.config.init_std, self.config.init_std)

    def forward(self) -> torch.Tensor:
        flat = self.embedding if self.mlp is None else self.mlp(self.embedding)
        kv = flat.view(self.length, self.num_layers, 2, self.num_heads, self.head_dim)
        return kv.permute(1, 2, 3, 0, 4)

    @torch.no_grad()
    def fold(self) -> "PrefixEncoder":
        """A flat encoder holding this encoder's current keys/values: same outputs, no MLP to save or run."""
        flat_config = PrefixConfig(**{**self.config.__dict__, "reparameterize": False})
        folded = PrefixEncoder(flat_config, self.num_layers, self.num_heads, self.head_dim)
        flat = self.embedding if self.mlp is None else self.mlp(self.embedding)
        folded.embedding.copy_(flat)
        return folded.to(self.embedding.device)
