"""The multi-task model: one frozen encoder, a prefix bank, and one head per task."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from multitask.backbone import encoder_shape, freeze
from multitask.encoder_stages import lower_states, upper_output
from multitask.heads import EncoderOutput
from multitask.prefix.bank import BatchTasks, PrefixBank, PrefixLayout
from multitask.prefix.mixture import input_summary
from multitask.prompt.bank import PromptBank


@dataclass
class ModelInputs:
    """A tokenized batch; ``task_ids`` index into the model's task list, one per example (tasks may mix).

    ``states``: when given, the hidden states entering layer ``boundary`` (from the frozen-layer cache, or computed
    once for several tasks): the encoder runs only from that layer up.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    task_ids: torch.Tensor
    token_type_ids: torch.Tensor | None = None
    states: torch.Tensor | None = None
    boundary: int = 0
    tasks: BatchTasks | None = None  # which tasks the rows hold, worked out on the host (see batch_tasks)
    # Whether some row is padded, known on the host (None: not known). Without padding the encoder gets no mask:
    # transformers would otherwise read the mask back from the device to find that out, in every forward.
    padded: bool | None = None

    def batch_tasks(self) -> BatchTasks:
        """The batch's tasks and each one's rows; computed once, where the task ids are, and carried by ``to``."""
        if self.tasks is None:
            self.tasks = BatchTasks.of(self.task_ids)
        return self.tasks

    @classmethod
    def of_task(cls, batch, task_id: int) -> "ModelInputs":
        """A one-task batch (``multitask.tasks.base.Batch``): every row gets ``task_id``."""
        task_ids = torch.full((batch.input_ids.shape[0],), task_id, dtype=torch.long)
        return cls(batch.input_ids, batch.attention_mask, task_ids, batch.token_type_ids)

    def rows(self, index: torch.Tensor) -> "ModelInputs":
        take = lambda t: None if t is None else t[index]  # noqa: E731
        return ModelInputs(take(self.input_ids), take(self.attention_mask), take(self.task_ids),
                           take(self.token_type_ids), take(self.states), self.boundary)

    def to(self, device: torch.device | str) -> "ModelInputs":
        """On ``device``, with the batch's tasks worked out before the ids leave the host. Copies to a GPU do not
        block the host (a copy from pageable memory is staged before it returns, so the source may change after)."""
        non_blocking = torch.device(device).type == "cuda"
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        tasks = self.batch_tasks().to(device, non_blocking=non_blocking)
        padded = self.padded
        if padded is None and self.attention_mask.device.type == "cpu":
            padded = not bool(self.attention_mask.all())
        return ModelInputs(move(self.input_ids), move(self.attention_mask), move(self.task_ids),
                           move(self.token_type_ids), move(self.states), self.boundary, tasks, padded)

    def encoder_mask(self) -> torch.Tensor | None:
        """The padding mask the encoder's layers need: none where no row is padded (known on the host)."""
        return None if self.padded is False else self.attention_mask


@dataclass
class ParameterSummary:
    prefix: int  # trainable prefix parameters
    heads: int
    encoder: int
    encoder_trainable: int
    prefix_frozen: int = 0  # prefixes kept as they are (prefix.freeze)
    prompt: int = 0  # input prompts (method: prompt)

    @property
    def trainable(self) -> int:
        return self.prefix + self.prompt + self.heads + self.encoder_trainable

    def render(self) -> str:
        pct = lambda n: 100.0 * n / max(self.encoder, 1)  # noqa: E731
        parts = []
        if self.prefix or self.prefix_frozen or not self.prompt:  # a prompt run has no prefix to speak of
            parts.append(f"prefix parameters {self.prefix:,} ({pct(self.prefix):.3f}% of encoder)"
                         + (f", {self.prefix_frozen:,} more frozen" if self.prefix_frozen else ""))
        if self.prompt:
            parts.append(f"prompt parameters {self.prompt:,} ({pct(self.prompt):.3f}% of encoder)")
        parts += [f"head parameters {self.heads:,} ({pct(self.heads):.3f}%)",
                  f"encoder parameters {self.encoder:,} ({self.encoder_trainable:,} trainable)",
                  f"trainable total {self.trainable:,} ({pct(self.trainable):.3f}%)"]
        return " | ".join(parts)


class MultiTaskModel(nn.Module):
    def __init__(
        self,
        encoder: PreTrainedModel,
        heads: dict[str, nn.Module],
        layout: PrefixLayout | None,
        freeze_encoder: bool = True,
        prefix_modules: tuple[dict, dict] | None = None,
        prompt_bank: PromptBank | None = None,
    ) -> None:
        """``prefix_modules``: the layout's prefix encoders and mixtures, already built (see PrefixBank).
        ``prompt_bank``: soft prompts in front of the inputs (method: prompt), instead of a prefix layout."""
        super().__init__()
        self.encoder = encoder
        self.task_names = list(heads)
        self._task_ids = {task: index for index, task in enumerate(self.task_names)}
        self.heads = nn.ModuleDict(heads)
        shape = encoder_shape(encoder.config)
        self.prefix_bank = (
            PrefixBank(layout, shape.num_layers, shape.num_heads, shape.head_dim, prefix_modules)
            if layout is not None else None
        )
        if self.prefix_bank is not None and self.prefix_bank.task_names != self.task_names:
            raise ValueError("prefix layout and heads must list the same tasks in the same order")
        self.prompt_bank = prompt_bank
        if prompt_bank is not None and prompt_bank.task_names != self.task_names:
            raise ValueError("prompt bank and heads must list the same tasks in the same order")
        if freeze_encoder:
            freeze(self.encoder)

    def task_id(self, task: str) -> int:
        return self._task_ids[task]

    def frozen_below(self, task: str | None = None) -> int:
        """The lowest layer with a trainable prefix (of ``task``'s prefixes, or of any): nothing below it depends on
        a trained parameter (0 when the encoder itself trains; the number of layers when nothing in the encoder
        trains, as in a linear probe)."""
        if self.prompt_bank is not None or any(p.requires_grad for p in self.encoder.parameters()):
            return 0  # input prompts change layer 0's input, as a trained encoder changes every layer
        bank = self.prefix_bank
        names = [] if bank is None else bank.layout.task_prefixes[task] if task is not None else list(bank.encoders)
        encoders = [bank.encoders[name] for name in names]
        layers = [layer for encoder in encoders if encoder.length and encoder.trainable for layer in encoder.layers]
        return min(layers, default=encoder_shape(self.encoder.config).num_layers)

    def shared_below(self, task_ids: torch.Tensor) -> int:
        """The lowest layer where the prefixes of the given tasks differ: below it one pass serves them all."""
        if self.prompt_bank is not None:
            return 0  # each task's prompt is part of its input
        if self.prefix_bank is None:
            return encoder_shape(self.encoder.config).num_layers
        tasks = [self.task_names[i] for i in torch.unique(task_ids).tolist()]
        return self.prefix_bank.shared_below(tasks)

    def _prefix(self, inputs: ModelInputs):
        """The batch's prefixes (with each input's summary where a prefix mixes sources per input)."""
        bank = self.prefix_bank
        summary = input_summary(self.encoder.get_input_embeddings(), inputs.input_ids, inputs.attention_mask) \
            if bank.needs_summary else None
        return bank(inputs.task_ids, summary, inputs.batch_tasks())

    def encode_lower(self, inputs: ModelInputs, boundary: int) -> torch.Tensor:
        """The hidden states entering layer ``boundary`` (prefixes of the layers below included)."""
        prefix = self._prefix(inputs) if self.prefix_bank is not None and boundary else None
        return lower_states(self.encoder, inputs.input_ids, inputs.encoder_mask(), inputs.token_type_ids, boundary,
                            prefix)

    def encode(self, inputs: ModelInputs) -> EncoderOutput:
        if self.prompt_bank is not None:
            return self._encode_with_prompts(inputs)
        prefix = self._prefix(inputs) if self.prefix_bank is not None else None
        if inputs.states is not None:
            last, pooled = upper_output(self.encoder, inputs.states, inputs.encoder_mask(), inputs.boundary, prefix)
            return EncoderOutput(last, inputs.attention_mask, pooled)
        extra = {} if inputs.token_type_ids is None else {"token_type_ids": inputs.token_type_ids}
        output = self.encoder(
            input_ids=inputs.input_ids, attention_mask=inputs.encoder_mask(), prefix_kv=prefix, **extra
        )
        return EncoderOutput(output.last_hidden_state, inputs.attention_mask, getattr(output, "pooler_output", None))

    def _encode_with_prompts(self, inputs: ModelInputs) -> EncoderOutput:
        """Each row's task prompt in front of its word embeddings, through the whole encoder; the prompt positions
        are cut from the output, so every head (token-level ones included) sees exactly the input's positions."""
        if inputs.states is not None:
            raise ValueError("input prompts change layer 0's input: cached lower states cannot be used")
        words = self.encoder.get_input_embeddings()(inputs.input_ids)
        prompts = self.prompt_bank(inputs.task_ids).to(words.dtype)
        batch, length = prompts.shape[:2]
        extra = {}
        if inputs.token_type_ids is not None:
            extra["token_type_ids"] = torch.cat([inputs.token_type_ids.new_zeros(batch, length),
                                                 inputs.token_type_ids], dim=1)
        mask = inputs.encoder_mask()
        if mask is not None:
            mask = torch.cat([mask.new_ones(batch, length), mask], dim=1)
        output = self.encoder(inputs_embeds=torch.cat([prompts, words], dim=1), attention_mask=mask, **extra)
        last = output.last_hidden_state[:, length:]
        pooler = getattr(self.encoder, "pooler", None)  # it reads the first position: the input's [CLS], not a prompt
        return EncoderOutput(last, inputs.attention_mask, pooler(last) if pooler is not None else None)

    def forward(self, inputs: ModelInputs) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Logits per task present in the batch, with the batch rows they belong to."""
        encoded = self.encode(inputs)
        results = {}
        batch_tasks = inputs.batch_tasks()
        for task_id, rows in zip(batch_tasks.ids, batch_tasks.rows):
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
        frozen = sum(p.numel() for p in self.prefix_bank.parameters() if not p.requires_grad) \
            if self.prefix_bank is not None else 0
        return ParameterSummary(
            prefix=count(self.prefix_bank) - frozen, prefix_frozen=frozen, prompt=count(self.prompt_bank),
            heads=count(self.heads),
            encoder=count(self.encoder),
            encoder_trainable=sum(p.numel() for p in self.encoder.parameters() if p.requires_grad),
        )
