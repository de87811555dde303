"""A task's soft prompt: ``length`` vectors in the encoder's word-embedding space, trained directly or produced by
a prompt encoder (P-Tuning v1).

The prompt does not depend on the input, so a prompt encoder computes the same vectors every time: :meth:`fold`
evaluates it once and returns a flat prompt, which is what checkpoints hold and what serving runs.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from multitask.prompt.config import PromptConfig


class PromptEncoder(nn.Module):
    """Output: ``(length, dim)``, ``dim`` being the encoder's word-embedding size.

    ``encoder: none``: the output is the embedding itself. ``mlp``: embedding -> Linear-ReLU-Linear-ReLU-Linear.
    ``lstm``: embedding -> two-layer BiLSTM -> Linear-ReLU-Linear, as in P-Tuning v1 and PEFT's PromptEncoder (the
    LSTM lets neighbouring soft tokens depend on each other).
    """

    def __init__(self, config: PromptConfig, dim: int) -> None:
        super().__init__()
        self.config, self.dim, self.length = config, dim, config.length
        hidden = config.hidden_size or dim
        self.embedding = nn.Parameter(torch.randn(config.length, dim) * 0.02)  # until an initialiser sets it
        self.lstm: nn.LSTM | None = None
        self.mlp: nn.Sequential | None = None
        if config.encoder == "mlp":
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                     nn.Linear(hidden, dim))
        elif config.encoder == "lstm":
            self.lstm = nn.LSTM(dim, hidden, num_layers=2, bidirectional=True, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    @property
    def flat(self) -> bool:
        return self.mlp is None and self.lstm is None

    @torch.no_grad()
    def set_initial(self, vectors: torch.Tensor) -> None:
        """Start the embedding (what the prompt encoder reads, or the prompt itself when flat) at ``vectors``."""
        self.embedding.copy_(vectors.to(self.embedding))

    def forward(self) -> torch.Tensor:
        vectors = self.embedding
        if self.lstm is not None:
            vectors = self.lstm(vectors[None])[0][0]
        return self.mlp(vectors) if self.mlp is not None else vectors

    @torch.no_grad()
    def fold(self) -> "PromptEncoder":
        """A flat prompt with this one's current output (itself when already flat)."""
        if self.flat:
            return self
        folded = PromptEncoder(dataclasses.replace(self.config, encoder="none"), self.dim)
        folded.embedding.copy_(self.forward())
        return folded.to(self.embedding.device)
