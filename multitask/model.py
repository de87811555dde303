"""The multi-task model: one frozen encoder, a prefix bank, and one head per task."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from multitask.backbone import encoder_shape, freeze
from multitask.heads import EncoderOutput
from multitask.prefix.bank import PrefixBank, PrefixLayout


@dataclass
class ModelInputs:
    """A tokenized batch; ``task_ids`` index into the model's task list, one per example (tasks may mix)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    task_ids: torch.Tensor
    token_type_ids: torch.Tensor | None = None

    @classmethod
    def of_task(cls, batch, task_id: int) -> "ModelInputs":
        """A one-task batch (``multitask.tasks.base.Batch``): every row gets ``task_id``."""
        task_ids = torch.full((batch.input_ids.shape[0],), task_id, dtype=torch.long)
        return cls(batch.input_ids, batch.attention_mask, task_ids, batch.token_type_ids)

    def rows(self, index: torch.Tensor) -> "ModelInputs":
        take = lambda t: None if t is None else t[index]  # noqa: E731
        return ModelInputs(take(self.input_ids), take(self.attention_mask), take(self.task_ids), take(self.token_type_ids))

    def to(self, device: torch.device | str) -> "ModelInputs":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return ModelInputs(move(self.input_ids), move(self.attention_mask), move(self.task_ids), move(self.token_type_ids))


@dataclass
class ParameterSummary:
    prefix: int
    heads: int
    encoder: int
    encoder_trainable: int

    @property
    def trainable(self) -> int:
        return self.prefix + self.heads + self.encoder_trainable

    def render(self) -> str:
        pct = lambda n: 100.0 * n / max(self.encoder, 1)  # noqa: E731
        return (
            f"prefix parameters {self.prefix:,} ({pct(self.prefix):.3f}% of encoder) | "
            f"head parameters {self.heads:,} ({pct(self.heads):.3f}%) | "
            f"encoder parameters {self.encoder:,} ({self.encoder_trainable:,} trainable) | "
            f"trainable total {self.trainable:,} ({pct(self.trainable):.3f}%)"
        )


class MultiTaskModel(nn.Module):
    def __init__(
        self,
        encoder: PreTrainedModel,
        heads: dict[str, nn.Module],
        layout: PrefixLayout | None,
        freeze_encoder: bool = True,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.task_names = list(heads)
        self.heads = nn.ModuleDict(heads)
        shape = encoder_shape(encoder.config)
        self.prefix_bank = (
            PrefixBank(layout, shape.num_layers, shape.num_heads, shape.head_dim) if layout is not None else None
        )
        if self.prefix_bank is not None and self.prefix_bank.task_names != self.task_names:
            raise ValueError("prefix layout and heads must list the same tasks in the same order")
        if freeze_encoder:
            freeze(self.encoder)

    def task_id(self, task: str) -> int:
        return self.task_names.index(task)

    def encode(self, inputs: ModelInputs) -> EncoderOutput:
        prefix = self.prefix_bank(inputs.task_ids) if self.prefix_bank is not None else None
        extra = {} if inputs.token_type_ids is None else {"token_type_ids": inputs.token_type_ids}
        output = self.encoder(
            input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, prefix_kv=prefix, **extra
        )
        return EncoderOutput(output.last_hidden_state, inputs.attention_mask, getattr(output, "pooler_output", None))

    def forward(self, inputs: ModelInputs) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Logits per task present in the batch, with the batch rows they belong to."""
        encoded = self.encode(inputs)
        results = {}
        for task_id in torch.unique(inputs.task_ids).tolist():
            rows = (inputs.task_ids == task_id).nonzero(as_tuple=True)[0]
            part = EncoderOutput(
                encoded.hidden_states[rows],
                encoded.attention_mask[rows],
                None if encoded.pooled is None else encoded.pooled[rows],
            )
            task = self.task_names[task_id]
            results[task] = (self.heads[task](part), rows)
        return results

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_summary(self) -> ParameterSummary:
        count = lambda module: sum(p.numel() for p in module.parameters()) if module is not None else 0  # noqa: E731
        return ParameterSummary(
            prefix=count(self.prefix_bank),
            heads=count(self.heads),
            encoder=count(self.encoder),
            encoder_trainable=sum(p.numel() for p in self.encoder.parameters() if p.requires_grad),
        )
