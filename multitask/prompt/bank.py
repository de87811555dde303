"""One soft prompt per task, gathered per row so that a batch may mix tasks (all prompts have one length)."""

from __future__ import annotations

import torch
from torch import nn

from multitask.prompt.config import PromptConfig
from multitask.prompt.encoder import PromptEncoder


class PromptBank(nn.Module):
    def __init__(self, task_names: list[str], config: PromptConfig, dim: int) -> None:
        super().__init__()
        self.task_names = list(task_names)
        self.config, self.length = config, config.length
        self.prompts = nn.ModuleDict({task: PromptEncoder(config, dim) for task in task_names})

    def forward(self, task_ids: torch.Tensor) -> torch.Tensor:
        """``(batch, length, dim)``: each row's task's prompt (every task's prompt is computed: a training run holds
        a few tasks, and a served model's prompts are folded, so this is a lookup)."""
        return torch.stack([self.prompts[task]() for task in self.task_names])[task_ids]

    @torch.no_grad()
    def fold(self) -> None:
        """Replace every prompt encoder by its flat output (inference: computed once, not per batch)."""
        for task in self.task_names:
            self.prompts[task] = self.prompts[task].fold()
