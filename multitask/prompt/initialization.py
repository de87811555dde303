"""Where soft prompts start: the word embeddings of real tokens (``init: vocab``), or random at their scale.

Lester et al. found prompts started from vocabulary embeddings train faster and better than random ones, most of
all on small models; random vectors are drawn at the embedding table's own scale so that neither start drowns the
real tokens after the embedding LayerNorm.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from multitask.prefix.initialization import frequent_tokens, word_tokens
from multitask.prompt.bank import PromptBank

log = logging.getLogger(__name__)


def mean_pairwise_cosine(vectors: torch.Tensor) -> float:
    """Mean cosine similarity between the rows of ``(length, dim)`` (0: unrelated; 1: one vector repeated)."""
    if vectors.shape[0] < 2:
        return 0.0
    unit = torch.nn.functional.normalize(vectors.float(), dim=-1)
    similarity = unit @ unit.T
    count = vectors.shape[0]
    return float((similarity.sum() - similarity.diagonal().sum()) / (count * (count - 1)))


@torch.no_grad()
def initialize_prompts(bank: PromptBank, encoder: torch.nn.Module, tokenizer,
                       task_sequences: dict[str, Sequence[Sequence[int]]]) -> dict[str, float]:
    """Set every task's prompt to its configured start; returns each prompt's mean pairwise cosine (its initial
    tokens' diversity), keyed ``prompt_<task>``."""
    table = encoder.get_input_embeddings().weight.detach().float().cpu()
    scale = float(table.std())
    special = set(tokenizer.all_special_ids)
    similarity = {}
    for task, prompt in bank.prompts.items():
        vectors = torch.randn(prompt.length, table.shape[1]) * scale
        if prompt.config.init == "vocab":
            pool = frequent_tokens(task_sequences.get(task, []), special, prompt.length)
            words = list(dict.fromkeys(word_tokens(prompt.config.init_words, tokenizer) + pool))[: prompt.length]
            vectors[: len(words)] = table[words]  # too few distinct tokens: the rest stay random at the real scale
        prompt.set_initial(vectors)
        similarity[f"prompt_{task}"] = mean_pairwise_cosine(prompt().detach())
        log.info("prompt %s: init %s, %d tokens, mean pairwise cosine of initial tokens %.3f",
                 task, prompt.config.init, prompt.length, similarity[f"prompt_{task}"])
    return similarity
