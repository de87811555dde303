"""Settings of input prompts (``method: prompt``): length, prompt encoder, initialisation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# Default learning rates: flat prompts move in embedding space and need large steps (Lester et al. used 0.3 with
# Adafactor); a prompt encoder's weights, like any MLP's, train at the usual small rate.
FLAT_PROMPT_LR = 3e-2
PROMPT_ENCODER_LR = 1e-3


@dataclass
class PromptConfig:
    length: int = field(
        default=20,
        metadata={"help": "Soft tokens in front of every input. They take positions of the encoder's own: an input "
                  "may hold at most max_position_embeddings - length tokens."},
    )
    encoder: Literal["none", "mlp", "lstm"] = field(
        default="none",
        metadata={"help": "none: the soft tokens are trained directly (prompt tuning, Lester et al.); mlp or lstm: "
                  "they are produced from trainable embeddings by a prompt encoder (P-Tuning v1; lstm: a "
                  "two-layer BiLSTM then an MLP, as PEFT's PromptEncoder). Either way the checkpoint holds the "
                  "tokens themselves (the encoder is folded)."},
    )
    hidden_size: int | None = field(
        default=None, metadata={"help": "Hidden width of the prompt encoder (unset: the encoder's hidden size)."}
    )
    init: Literal["random", "vocab"] = field(
        default="vocab",
        metadata={"help": "random: normal at the scale of the encoder's word embeddings; vocab: the word embeddings "
                  "of init_words, then of the training data's most frequent tokens (Lester et al.'s sampled "
                  "vocabulary). With a prompt encoder this sets the embeddings it reads."},
    )
    lr: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the prompts and their prompt encoder (unset: 3e-2 for flat prompts, "
                  "1e-3 with a prompt encoder; chosen on SST-2, docs/benchmarks.md §16)."},
    )
    init_words: list[str] = field(
        default_factory=list, metadata={"help": "init: vocab: words whose embeddings start the soft tokens, in order."}
    )

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return FLAT_PROMPT_LR if self.encoder == "none" else PROMPT_ENCODER_LR

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ValueError(f"length must be >= 1, got {self.length}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.hidden_size is not None and self.hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {self.hidden_size}")
