"""The contract every task type fulfils: records -> examples -> features -> batches -> predictions -> metrics.

A task type is one module that subclasses :class:`TaskType` and registers it in ``TASK_TYPES``; the trainer,
evaluator, predictor and reports only ever talk to this interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from multitask.data.features import Feature
from multitask.data.records import Record
from multitask.errors import ConfigError, DataError
from multitask.metrics import MetricResult
from multitask.registry import Registry
from multitask.tasks.config import TaskConfig
from multitask.tuning import TuningDefaults

TASK_TYPES: Registry[type["TaskType"]] = Registry("task type")
# Examples tokenised per call when featurizing with a progress bar (one call per chunk, so the bar moves).
FEATURIZE_CHUNK = 1024


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor | None
    targets: torch.Tensor | None
    feature_indices: list[int] = field(default_factory=list)


def pad_features(features: Sequence[Feature], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Pad to the longest feature of the batch only (dynamic padding)."""
    longest = max(len(f) for f in features)
    ids = torch.full((len(features), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(features), longest), dtype=torch.long)
    types = None if features[0].token_type_ids is None else torch.zeros((len(features), longest), dtype=torch.long)
    for row, feature in enumerate(features):
        ids[row, : len(feature)] = torch.tensor(feature.input_ids)
        mask[row, : len(feature)] = 1
        if types is not None:
            types[row, : len(feature)] = torch.tensor(feature.token_type_ids)
    return ids, mask, types


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities over the last axis, shifted by the maximum so that no logit overflows."""
    exponentials = np.exp(logits - logits.max(-1, keepdims=True))
    return exponentials / exponentials.sum(-1, keepdims=True)


class TaskType(ABC):
    """Base of every task type. Subclasses set the class attributes and implement the abstract stages."""

    name: ClassVar[str]
    head_kind: ClassVar[str]
    required_fields: ClassVar[tuple[str, ...]]
    optional_fields: ClassVar[tuple[str, ...]] = ()
    metric_names: ClassVar[tuple[str, ...]]
    default_main_metric: ClassVar[str]
    options_type: ClassVar[type | None] = None
    has_labels: ClassVar[bool] = True
    # What one prediction input looks like (JSON Schema): shown by the server's /v1/tasks and `multitask types`.
    input_schema: ClassVar[dict[str, Any]] = {}
    accepts_plain_text: ClassVar[bool] = True  # whether a bare string is a whole input (`analyze` runs such tasks)
    # Measured for classification (SST-2) and ner (CoNLL-2003), checked on qa (SQuAD): docs/tuning.md. A type that
    # trains better otherwise sets its own.
    tuning_defaults: ClassVar[TuningDefaults] = TuningDefaults()

    def __init__(self, config: TaskConfig, options: Any = None) -> None:
        self.config = config
        self.options = options
        self.labels: list[str] = list(config.labels or [])

    # ---- records -> examples
    def field_value(self, record: Record, name: str, required: bool = True) -> Any:
        """Read the record's value for one of the type's fields, through the YAML's field mapping."""
        key = str(self.config.fields.get(name, name))
        if key not in record.fields:
            if required:
                known = ", ".join(sorted(map(str, record.fields)))
                raise DataError(f"{record.source}: task {self.config.name!r} needs field {key!r} "
                                f"(for '{name}'); the record has: {known}")
            return None
        return record.fields[key]

    @abstractmethod
    def example_from_record(self, record: Record, index: int) -> Any: ...

    def examples(self, records: list[Record]) -> list[Any]:
        return [self.example_from_record(record, index) for index, record in enumerate(records)]

    @abstractmethod
    def example_from_raw(self, raw: dict[str, Any], index: int) -> Any:
        """Build an unlabelled example from a prediction input (raw text in JSONL)."""

    def request_all_scores(self, example: Any) -> None:
        """Ask for every label's score in this example's prediction (``--all-scores``). A flag on the example, not on
        the task: one model pass serves many requests, and each may ask or not. Types that always give every score
        (multilabel) or have no labels ignore it."""

    # ---- labels
    def example_labels(self, example: Any) -> list[str]:
        """Labels an example carries, for inferring the label set; types without labels return []."""
        return []

    def fit_labels(self, train_examples: list[Any]) -> None:
        """Infer the label set from train (sorted, so it is stable) unless the YAML lists it."""
        if not self.has_labels or self.labels:
            return
        self.labels = sorted({label for example in train_examples for label in self.example_labels(example)})
        if not self.labels:
            raise ConfigError(f"task {self.config.name!r}: the {len(train_examples)} training examples carry no label "
                              f"(check the 'fields' mapping of the label column, or list them under 'labels')")

    def label_name(self, label: str) -> str:
        """The name people read for a label (``label_names`` in the task file), else the label itself."""
        return (self.config.label_names or {}).get(label, label)

    def check_label_names(self) -> None:
        names = self.config.label_names or {}
        unknown = [label for label in names if label not in self.labels]
        if unknown:
            raise ConfigError(f"task {self.config.name!r}: label_names names label {unknown[0]!r}, which is not in "
                              f"the label set {self.labels}")
        shown = [self.label_name(label) for label in self.labels]
        if len(set(shown)) != len(shown):
            raise ConfigError(f"task {self.config.name!r}: label_names gives two labels the same name ({shown})")

    def check_labels(self, examples: list[Any], split: str) -> None:
        self.check_label_names()
        known = set(self.labels)
        for example in examples:
            unknown = [label for label in self.example_labels(example) if label not in known]
            if unknown:
                raise DataError(f"task {self.config.name!r} split {split!r}: label {unknown[0]!r} is not in the "
                                f"label set {self.labels}")

    def example_is_labelled(self, example: Any) -> bool:
        """Whether the example carries gold annotations; types whose gold may be empty override this."""
        return bool(self.example_labels(example))

    def is_labelled(self, examples: list[Any]) -> bool:
        """Whether every example can be scored (not only predicted)."""
        return all(self.example_is_labelled(example) for example in examples)

    @property
    def num_outputs(self) -> int:
        return len(self.labels)

    # ---- examples -> features -> batches
    @abstractmethod
    def featurize(self, examples: list[Any], tokenizer, training: bool) -> list[Feature]: ...

    def collate(self, features: Sequence[Feature], pad_id: int) -> Batch:
        ids, mask, types = pad_features(features, pad_id)
        return Batch(ids, mask, types, self.collate_targets(features, ids.shape[1]))

    @abstractmethod
    def collate_targets(self, features: Sequence[Feature], length: int) -> torch.Tensor | None: ...

    @abstractmethod
    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

    def loss_terms(self, targets: torch.Tensor) -> int:
        """How many terms ``loss`` averages over (here: one per row). Data-parallel training weights each rank's
        loss by its share of the global batch's terms, so the gradient equals one process's on the whole batch;
        a type whose loss averages over something else (tokens) overrides this."""
        return int(targets.shape[0])

    def evidence_rows(self, inputs: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One model input's head inputs and target as rows for ``prefix.transfer: auto``'s evidence
        (:mod:`multitask.training.transfer_evidence`): one row per loss term, the targets as columns. Here: the
        sequence head's one input vector and its class, one-hot."""
        return inputs[None], torch.nn.functional.one_hot(target, self.num_outputs)[None].float()

    # ---- logits -> predictions -> metrics
    @abstractmethod
    def decode(self, examples: list[Any], features: list[Feature], logits: list[np.ndarray]) -> list[Any]:
        """One prediction per example from the logits of its features (each trimmed to the feature's length)."""

    @abstractmethod
    def score(self, examples: list[Any], predictions: list[Any]) -> MetricResult: ...

    @abstractmethod
    def prediction_record(self, example: Any, prediction: Any) -> dict[str, Any]:
        """A JSON-able row for predictions.jsonl."""

    def main_metric(self) -> str:
        main = self.config.main_metric or self.default_main_metric
        if main not in self.metric_names:
            raise ConfigError(f"task {self.config.name!r}: main_metric {main!r} is not one of {list(self.metric_names)}")
        return main


def featurize_examples(
    task: TaskType, examples: list[Any], tokenizer, training: bool, progress: bool = False
) -> list[Feature]:
    """The task's features for ``examples``, tokenised in chunks under a progress bar when there are many."""
    if not progress or len(examples) <= FEATURIZE_CHUNK:
        return task.featurize(examples, tokenizer, training)
    features: list[Feature] = []
    with tqdm(total=len(examples), desc=f"tokenising {task.config.name}", unit="ex", disable=None,
              leave=False) as bar:
        for start in range(0, len(examples), FEATURIZE_CHUNK):
            chunk = task.featurize(examples[start : start + FEATURIZE_CHUNK], tokenizer, training)
            for feature in chunk:  # a chunk numbers its examples from 0
                feature.example_index += start
            features.extend(chunk)
            bar.update(min(FEATURIZE_CHUNK, len(examples) - start))
    return features
