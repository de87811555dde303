"""Multi-label classification (GoEmotions, topic tags): any number of labels per text.

This is the worked example of adding a task type: a dataclass of options, the stages of
:class:`~multitask.tasks.base.TaskType`, and one ``TASK_TYPES.register`` line at the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from multitask.data.features import Feature
from multitask.data.records import Record
from multitask.errors import DataError
from multitask.metrics import MetricResult, multilabel_metrics
from multitask.tasks.base import TASK_TYPES, TaskType
from multitask.tasks.classification import (
    TEXT_INPUT_SCHEMA, TextExample, read_text_fields, text_example_from_raw, text_features,
)
from multitask.tasks.config import TaskConfig


@dataclass
class MultiLabelOptions:
    label_separator: str = field(
        default=",", metadata={"help": "Separator of the labels when a record gives them as one string."}
    )
    threshold: float = field(default=0.5, metadata={"help": "A label is predicted when its probability exceeds this."})

    def __post_init__(self) -> None:
        if not self.label_separator:
            raise ValueError("label_separator must not be empty")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")


def parse_labels(value: Any, separator: str, source: str) -> list[str]:
    """Labels from a JSON list or a separated string, stripped, without empties or repeats."""
    if isinstance(value, str):
        parts = value.split(separator)
    elif isinstance(value, list):
        parts = [str(part) for part in value]
    else:
        raise DataError(f"{source}: labels must be a list or a {separator!r}-separated string, "
                        f"got {type(value).__name__}")
    return list(dict.fromkeys(part.strip() for part in parts if part.strip()))


def sigmoid(values: np.ndarray) -> np.ndarray:
    """The logistic function in its tanh form, which cannot overflow for large logits."""
    return 0.5 * (1.0 + np.tanh(0.5 * values))


class MultiLabelTask(TaskType):
    name = "multilabel"
    input_schema = TEXT_INPUT_SCHEMA
    head_kind = "sequence"
    required_fields = ("text", "labels")
    optional_fields = ("text_pair", "id")
    metric_names = ("micro_f1", "macro_f1", "exact_match")
    default_main_metric = "micro_f1"
    options_type = MultiLabelOptions

    def __init__(self, config: TaskConfig, options: MultiLabelOptions | None = None) -> None:
        super().__init__(config, options or MultiLabelOptions())

    def example_from_record(self, record: Record, index: int) -> TextExample:
        labels = self.field_value(record, "labels", required=False)
        return TextExample(
            *read_text_fields(self, record, index),
            None if labels is None else parse_labels(labels, self.options.label_separator, record.source),
        )

    def example_from_raw(self, raw: dict[str, Any], index: int) -> TextExample:
        return text_example_from_raw(raw, index, f"input line {index + 1}")

    def example_labels(self, example: TextExample) -> list[str]:
        return example.label or []

    def example_is_labelled(self, example: TextExample) -> bool:
        """An empty label set is a valid gold answer here, so only a missing one means unlabelled."""
        return example.label is not None

    def featurize(self, examples: list[TextExample], tokenizer, training: bool) -> list[Feature]:
        return text_features(examples, tokenizer, self.config.max_length, self.multi_hot)

    def multi_hot(self, example: TextExample) -> list[float]:
        return [1.0 if label in example.label else 0.0 for label in self.labels]

    def collate_targets(self, features: Sequence[Feature], length: int) -> torch.Tensor | None:
        if any(f.target is None for f in features):
            return None
        return torch.tensor([f.target for f in features], dtype=torch.float)

    def evidence_rows(self, inputs: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One row; each label's 0/1 target is a column."""
        return inputs[None], target[None].float()

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), targets)

    def decode(self, examples, features, logits: list[np.ndarray]) -> list[dict[str, Any]]:
        """Every label whose probability exceeds the threshold, possibly none; ``probabilities``: each label's own
        sigmoid probability (they do not sum to 1: labels are independent)."""
        predictions = []
        for row in logits:
            probabilities = sigmoid(row)
            predictions.append({
                "labels": [label for label, p in zip(self.labels, probabilities) if p > self.options.threshold],
                "probabilities": {label: float(p) for label, p in zip(self.labels, probabilities)},
            })
        return predictions

    def score(self, examples: list[TextExample], predictions: list[dict[str, Any]]) -> MetricResult:
        names = lambda labels: [self.label_name(label) for label in labels]  # noqa: E731
        return multilabel_metrics([names(e.label) for e in examples], [names(p["labels"]) for p in predictions],
                                  names(self.labels))

    def prediction_record(self, example: TextExample, prediction: dict[str, Any]) -> dict[str, Any]:
        row: dict[str, Any] = {"id": example.guid, "text": example.text}
        if example.text_pair is not None:
            row["text_pair"] = example.text_pair
        if example.label is not None:
            row["gold"] = [self.label_name(label) for label in example.label]
        shown = {"labels": [self.label_name(label) for label in prediction["labels"]],
                 "probabilities": {self.label_name(k): p for k, p in prediction["probabilities"].items()}}
        return {**row, **prediction, **shown}


TASK_TYPES.register("multilabel", MultiLabelTask)
