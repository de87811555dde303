"""Sentence and sentence-pair classification (SST-2, TREC, ChnSentiCorp, NLI-style pairs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from multitask.data.features import Feature
from multitask.data.records import Record
from multitask.errors import DataError
from multitask.metrics import MetricResult, classification_metrics
from multitask.tasks.base import TASK_TYPES, TaskType, softmax


@dataclass
class TextExample:
    guid: str
    text: str
    text_pair: str | None = None
    label: Any = None  # a label string (classification) or a list of them (multi-label)
    all_scores: bool = False  # predict every label's score, not only the chosen one's (TaskType.request_all_scores)


TEXT_INPUT_SCHEMA: dict[str, Any] = {
        "oneOf": [
            {"type": "string", "description": "the text"},
            {"type": "object", "required": ["text"], "properties": {
                "text": {"type": "string"}, "text_pair": {"type": "string", "description": "second text of a pair"},
                "id": {"type": "string"}}},
        ]
    }


def text_example_from_raw(raw: dict[str, Any], index: int, source: str) -> TextExample:
    """Prediction input: ``{"text": ..., "text_pair": ...}`` (a bare string is taken as the text)."""
    if isinstance(raw, str):
        raw = {"text": raw}
    if not isinstance(raw, dict) or not isinstance(raw.get("text"), str):
        raise DataError(f"{source}: expected an object with a string 'text' (and optional 'text_pair')")
    if raw.get("text_pair") is not None and not isinstance(raw["text_pair"], str):
        raise DataError(f"{source}: 'text_pair' must be a string, got {type(raw['text_pair']).__name__}")
    return TextExample(str(raw.get("id", index)), raw["text"], raw.get("text_pair"))


def read_text_fields(task: TaskType, record: Record, index: int) -> tuple[str, str, str | None]:
    """(guid, text, text_pair) of a record, through the task's field mapping; shared by text task types."""
    pair = task.field_value(record, "text_pair", required="text_pair" in task.config.fields)
    guid = task.field_value(record, "id", required=False)
    return str(guid if guid is not None else index), str(task.field_value(record, "text")), (
        None if pair is None else str(pair)
    )


def text_features(
    examples: Sequence[TextExample], tokenizer, max_length: int, target_of: Callable[[TextExample], Any]
) -> list[Feature]:
    """One feature per example, single texts and pairs alike (detected per example: inputs may mix them), tokenized
    in one batch call per kind; ``target_of`` gives its target."""
    features: list[Feature | None] = [None] * len(examples)
    for paired in (False, True):
        indices = [i for i, e in enumerate(examples) if (e.text_pair is not None) == paired]
        if not indices:
            continue
        texts = [examples[i].text for i in indices]
        pairs = [examples[i].text_pair for i in indices] if paired else None
        encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length)
        for row, i in enumerate(indices):
            features[i] = Feature(
                input_ids=encoded["input_ids"][row],
                token_type_ids=encoded["token_type_ids"][row] if "token_type_ids" in encoded else None,
                example_index=i,
                target=None if examples[i].label is None else target_of(examples[i]),
            )
    return features


class ClassificationTask(TaskType):
    name = "classification"
    input_schema = TEXT_INPUT_SCHEMA
    head_kind = "sequence"
    required_fields = ("text", "label")
    optional_fields = ("text_pair", "id")
    metric_names = ("accuracy", "macro_f1", "weighted_f1")
    default_main_metric = "accuracy"

    def example_from_record(self, record: Record, index: int) -> TextExample:
        label = self.field_value(record, "label", required=False)
        return TextExample(*read_text_fields(self, record, index), None if label is None else str(label))

    def example_from_raw(self, raw: dict[str, Any], index: int) -> TextExample:
        return text_example_from_raw(raw, index, f"input line {index + 1}")

    def request_all_scores(self, example: TextExample) -> None:
        example.all_scores = True

    def example_labels(self, example: TextExample) -> list[str]:
        return [] if example.label is None else [example.label]

    def featurize(self, examples: list[TextExample], tokenizer, training: bool) -> list[Feature]:
        index = {label: i for i, label in enumerate(self.labels)}
        return text_features(examples, tokenizer, self.config.max_length, lambda e: index[e.label])

    def collate_targets(self, features: Sequence[Feature], length: int) -> torch.Tensor | None:
        if any(f.target is None for f in features):
            return None
        return torch.tensor([f.target for f in features], dtype=torch.long)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits.float(), targets)

    def decode(self, examples, features, logits: list[np.ndarray]) -> list[dict[str, Any]]:
        """``score``: the chosen label's softmax probability; ``scores``: every label's, when the example asks."""
        predictions = []
        for example, row in zip(examples, logits):
            probabilities = softmax(row)
            best = int(row.argmax())
            prediction = {"label": self.labels[best], "score": float(probabilities[best])}
            if example.all_scores:
                prediction["scores"] = {label: float(p) for label, p in zip(self.labels, probabilities)}
            predictions.append(prediction)
        return predictions

    def score(self, examples: list[TextExample], predictions: list[dict[str, Any]]) -> MetricResult:
        # Scored over the labels' names, so per-class scores and the confusion matrix read as people name them.
        name = self.label_name
        return classification_metrics([name(e.label) for e in examples], [name(p["label"]) for p in predictions],
                                      [name(label) for label in self.labels])

    def prediction_record(self, example: TextExample, prediction: dict[str, Any]) -> dict[str, Any]:
        row = {"id": example.guid, "text": example.text}
        if example.text_pair is not None:
            row["text_pair"] = example.text_pair
        if example.label is not None:
            row["gold"] = self.label_name(example.label)
        shown = {"label": self.label_name(prediction["label"])}
        if "scores" in prediction:
            shown["scores"] = {self.label_name(label): p for label, p in prediction["scores"].items()}
        if self.config.label_names:
            shown["label_id"] = prediction["label"]  # the label as in the data, beside its name
        return {**row, **prediction, **shown}


TASK_TYPES.register("classification", ClassificationTask)
