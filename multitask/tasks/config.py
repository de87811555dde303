"""The task YAML schema: one file per task under tasks/."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from multitask.data.hub import HubSource
from multitask.heads.base import HeadConfig
from multitask.prefix.config import PrefixAttention, check_layers, check_transfer


@dataclass
class SplitSource:
    """Where one split's data comes from: a local file (relative to the data root) or a Hugging Face dataset."""

    format: str = field(metadata={"help": "Reader: csv, tsv, json, jsonl, conll, squad, label_line or hf_dataset."})
    path: str | None = field(
        default=None, metadata={"help": "File relative to the data root (or absolute); unset for hub datasets."}
    )
    options: dict[str, Any] = field(default_factory=dict, metadata={"help": "Reader options (docs/tasks.md, formats)."})
    limit: int | None = field(default=None, metadata={"help": "Keep only the first N examples (quick runs)."})
    hub: HubSource | None = field(
        default=None, metadata={"help": "The split on the Hugging Face hub, read when the local file is missing."}
    )


@dataclass
class CarveConfig:
    """Carve a validation split out of train, whole groups (e.g. articles) at a time, with a fixed seed."""

    validation_fraction: float = field(default=0.1, metadata={"help": "Share of train records moved to validation."})
    group_field: str | None = field(
        default=None, metadata={"help": "Record field naming the group (QA: title); unset carves single records."}
    )
    seed: int = field(default=13, metadata={"help": "Seed of the carve: the same seed gives the same split."})

    def __post_init__(self) -> None:
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in (0, 1), got {self.validation_fraction}")


@dataclass
class TaskData:
    train: SplitSource | None = field(default=None, metadata={"help": "Training data."})
    validation: SplitSource | None = field(default=None, metadata={"help": "Validation data."})
    test: SplitSource | None = field(default=None, metadata={"help": "Optional test data (evaluated, never trained)."})
    carve: CarveConfig | None = field(
        default=None, metadata={"help": "Carve validation from train (only when no validation source is given)."}
    )

    def __post_init__(self) -> None:
        if self.carve is not None and self.validation is not None:
            raise ValueError("give either 'validation' or 'carve', not both")
        if self.carve is not None and self.train is None:
            raise ValueError("'carve' needs a 'train' source")


@dataclass
class TaskPrefixSettings:
    group: str | None = field(default=None, metadata={"help": "Prefix group (groups mode): same group, same prefix."})
    length: int | None = field(default=None, metadata={"help": "Prefix length for this task (default: the type's)."})
    reparameterize: bool | None = field(default=None, metadata={"help": "MLP reparameterisation (default: the type's)."})
    dropout: float | None = field(default=None, metadata={"help": "Prefix dropout (default: the type's)."})
    lr: float | None = field(default=None, metadata={"help": "Learning rate of this task's prefix (default: the type's)."})
    attention: PrefixAttention | None = field(
        default=None, metadata={"help": "joint or separate attention to this task's prefix (default: the type's; "
                                        "see the experiment's prefix.attention)."}
    )
    layers: Literal["all"] | dict[str, int] | list[int] | None = field(
        default=None, metadata={"help": "Layers of this task's own prefix: all, {top: k}, {bottom: k} or indices "
                                        "(default: the experiment's prefix.layers)."}
    )

    transfer: str | None = field(
        default=None, metadata={"help": "Growing a model: how this task's prefix starts (none, auto or a base prefix "
                                        "name; default: the experiment's prefix.transfer)."}
    )

    def __post_init__(self) -> None:
        if self.layers is not None:
            check_layers(self.layers)
        if self.transfer is not None:
            check_transfer(self.transfer)


@dataclass
class TaskConfig:
    name: str = field(metadata={"help": "Unique task name (letters, digits, '_' or '-')."})
    type: str = field(metadata={"help": "Task type: classification, ner, qa, multilabel (see `multitask types`)."})
    data: TaskData = field(metadata={"help": "Data of each split."})
    fields: dict[str, str | int] = field(
        default_factory=dict, metadata={"help": "Map the type's field names to the record's columns or keys."}
    )
    labels: list[str] | None = field(
        default=None, metadata={"help": "The label set; inferred from train (sorted) when unset."}
    )
    label_names: dict[str, str] | None = field(
        default=None, metadata={"help": "Names people read for labels, e.g. {\"0\": negative, \"1\": positive}: "
                                        "predictions and reports show them (the model keeps the labels)."}
    )
    metrics: list[str] | None = field(default=None, metadata={"help": "Metrics to report (default: all of the type's)."})
    main_metric: str | None = field(default=None, metadata={"help": "Metric used for model selection."})
    max_length: int = field(default=128, metadata={"help": "Maximum tokens per feature (windows beyond this)."})
    prefix: TaskPrefixSettings = field(default_factory=TaskPrefixSettings, metadata={"help": "Prefix settings."})
    head: HeadConfig = field(default_factory=HeadConfig, metadata={"help": "Head settings."})
    options: dict[str, Any] = field(default_factory=dict, metadata={"help": "Options of the task type."})
    description: str = field(default="", metadata={"help": "Free text: where the data comes from, licence notes."})

    def __post_init__(self) -> None:
        if self.max_length < 8:
            raise ValueError(f"max_length must be >= 8, got {self.max_length}")
