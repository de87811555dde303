"""Prefix encoders: produce per-layer prefix keys/values, either directly or through an MLP."""

from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

import torch
from torch import nn

from multitask.prefix.config import PrefixConfig, resolve_layers


_INITIALIZE: ContextVar[bool] = ContextVar("prefix_initialize", default=True)


@contextmanager
def without_initialization() -> Iterator[None]:
    """Build prefix encoders with uninitialised weights, for weights loaded right after (a checkpoint, a fold):
    the random start would cost more than the load itself on a server loading thousands of prefixes."""
    token = _INITIALIZE.set(False)
    try:
        yield
    finally:
        _INITIALIZE.reset(token)


class PrefixEncoder(nn.Module):
    """Learned keys/values for ``length`` virtual tokens in the attention layers its config names (``layers``).

    Output shape: ``(len(layers), 2, num_heads, length, head_dim)`` where index 0/1 of dim 1 is key/value and row
    ``i`` of dim 0 belongs to encoder layer ``layers[i]``.
    With ``reparameterize`` the values come from a small MLP over a prefix embedding (P-Tuning v2's
    reparameterisation); :meth:`fold` evaluates the MLP once and returns an equivalent flat encoder.
    Both kinds start from the same initial keys/values (:meth:`set_initial`), so the virtual tokens start as
    distinct as the chosen initialisation makes them.
    """

    def __init__(self, config: PrefixConfig, encoder_layers: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.config = config
        self.encoder_layers = encoder_layers
        self.layers = resolve_layers(config.layers, encoder_layers)
        self.num_layers, self.num_heads, self.head_dim = len(self.layers), num_heads, head_dim
        self.length = config.length
        out_dim = self.num_layers * 2 * num_heads * head_dim
        if config.reparameterize:
            hidden = num_heads * head_dim
            self.embedding = nn.Parameter(torch.empty(config.length, hidden))
            self.mlp = nn.Sequential(
                nn.Linear(hidden, config.mlp_hidden_size), nn.Tanh(), nn.Linear(config.mlp_hidden_size, out_dim)
            )
        else:
            self.embedding = nn.Parameter(torch.empty(config.length, out_dim))
            self.mlp = None
        # Until an encoder-aware initialiser (multitask.prefix.initialization) sets real scales or activations,
        # start from random keys/values at init_std (unit scale when that is left to the encoder); not when saved
        # weights are about to replace them (see `without_initialization`).
        if _INITIALIZE.get():
            self.set_initial(random_key_values(config, self.kv_shape, scale=config.init_std or 1.0))

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    @property
    def kv_shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.num_heads, self.length, self.head_dim)

    @torch.no_grad()
    def set_initial(self, kv: torch.Tensor) -> None:
        """Make the encoder output exactly ``kv`` (shape :attr:`kv_shape`).

        Flat: the embedding is ``kv``. Reparameterised: a fresh N(0, 1) embedding through the first layer, and the
        output layer solved by least squares (zero bias) so the MLP reproduces ``kv``. PyTorch's default output bias
        would otherwise dominate a small embedding and start every virtual token as the same vector.
        """
        target = kv.permute(3, 0, 1, 2, 4).reshape(self.length, self.embedding.shape[1] if self.mlp is None
                                                   else self.mlp[2].out_features).to(self.embedding)
        if self.length == 0:
            return
        if self.mlp is None:
            self.embedding.copy_(target)
            return
        nn.init.normal_(self.embedding)
        hidden = torch.tanh(self.mlp[0](self.embedding))
        self.mlp[2].weight.copy_((torch.linalg.pinv(hidden) @ target).T)
        self.mlp[2].bias.zero_()

    def forward(self) -> torch.Tensor:
        flat = self.embedding if self.mlp is None else self.mlp(self.embedding)
        kv = flat.view(self.length, self.num_layers, 2, self.num_heads, self.head_dim)
        return kv.permute(1, 2, 3, 0, 4)

    @torch.no_grad()
    def fold(self) -> "PrefixEncoder":
        """A flat encoder holding this encoder's current keys/values: same outputs, no MLP to save or run. A flat
        encoder is its own fold (no copy: a server folds thousands of loaded prefixes)."""
        if self.mlp is None:
            return self
        flat_config = PrefixConfig(**{**self.config.__dict__, "reparameterize": False})
        with without_initialization():
            folded = PrefixEncoder(flat_config, self.encoder_layers, self.num_heads, self.head_dim)
        flat = self.embedding if self.mlp is None else self.mlp(self.embedding)
        folded.embedding.copy_(flat)
        return folded.to(self.embedding.device)


def random_key_values(config: PrefixConfig, shape: tuple[int, ...], scale: float | torch.Tensor) -> torch.Tensor:
    """Random keys/values with standard deviation ``scale`` (a number, or a tensor broadcast over ``shape``)."""
    if config.init == "uniform":
        unit = (torch.rand(shape) * 2 - 1) * math.sqrt(3.0)  # uniform with unit variance
    else:
        unit = torch.randn(shape)
    return unit * scale
