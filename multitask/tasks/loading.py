"""Load task YAML files into task types, and their data into typed examples per split."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from multitask.config import from_dict, load_yaml
from multitask.data.hub import ROW_FORMATS, HubLoadError, hub_records
from multitask.data.readers import READERS
from multitask.data.records import Record
from multitask.data.splits import carve_by_group
from multitask.errors import ConfigError, DataError
from multitask.tasks.base import TASK_TYPES, TaskType
from multitask.tasks.config import SplitSource, TaskConfig

SPLITS = ("train", "validation", "test")


@dataclass
class LoadedTask:
    """A task type plus its examples per split (validation may be carved out of train)."""

    task: TaskType
    source: str
    examples: dict[str, list[Any]]


def deep_merge(base: dict, overrides: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def task_type_from_config(config: TaskConfig, source: str, lines: dict[str, int] | None = None) -> TaskType:
    """Validate the type-specific parts of a task (fields, options, metrics) and build its task type."""
    task_cls = TASK_TYPES.get(config.type) if config.type in TASK_TYPES else None
    if task_cls is None:
        raise ConfigError(f"{source}: key 'type': expected one of {', '.join(TASK_TYPES.available())}, "
                          f"got {config.type!r}")
    allowed = set(task_cls.required_fields) | set(task_cls.optional_fields)
    for name in config.fields:
        if name not in allowed:
            raise ConfigError(f"{source}: key {'fields.' + name!r}: unknown field for type {config.type!r}; "
                              f"allowed: {', '.join(sorted(allowed))}")
    options = None
    if task_cls.options_type is not None:
        options = from_dict(task_cls.options_type, config.options, source=source, lines=lines, path="options")
    elif config.options:
        raise ConfigError(f"{source}: key 'options': type {config.type!r} takes no options")
    for metric in config.metrics or []:
        if metric not in task_cls.metric_names:
            raise ConfigError(f"{source}: key 'metrics': {metric!r} is not a metric of type {config.type!r}; "
                              f"known: {', '.join(task_cls.metric_names)}")
    for split, split_source in _sources(config):
        if split_source.format not in READERS:
            raise ConfigError(f"{source}: key 'data.{split}.format': expected one of "
                              f"{', '.join(READERS.available())}, got {split_source.format!r}")
        from_dict(READERS.get(split_source.format).options_type, split_source.options, source=source,
                  lines=lines, path=f"data.{split}.options")
        if split_source.hub is not None:
            if split_source.format not in ROW_FORMATS:
                raise ConfigError(f"{source}: key 'data.{split}.hub': format {split_source.format!r} cannot be read "
                                  f"from the hub; formats that can: {', '.join(sorted(ROW_FORMATS))}")
            from_dict(READERS.get(split_source.format).options_type, _hub_options(split_source), source=source,
                      lines=lines, path=f"data.{split}.hub.options")
    task = task_cls(config, options)
    try:
        task.main_metric()
    except ConfigError as error:
        raise ConfigError(f"{source}: key 'main_metric': {error}") from None
    return task


def load_task(path: str | Path, overrides: dict[str, Any] | None = None) -> TaskType:
    """Read and validate one task YAML (with optional overrides deep-merged from the experiment)."""
    data, lines = load_yaml(path)
    if overrides:
        data = deep_merge(data, overrides)
    config = from_dict(TaskConfig, data, source=str(path), lines=lines)
    return task_type_from_config(config, str(path), lines)


def _sources(config: TaskConfig) -> list[tuple[str, SplitSource]]:
    return [(split, getattr(config.data, split)) for split in SPLITS if getattr(config.data, split) is not None]


def read_split(source: SplitSource, root: Path, where: str, origin: str = "") -> list[Record]:
    """Read one split: its local file, or its ``hub`` copy when the file is missing (or none is named). A missing
    file without a hub copy says where the data root is and, from the task's description, where the dataset comes
    from; a hub copy that cannot be loaded says so in one line naming both the local path and the hub source."""
    reader = READERS.get(source.format)
    path = None
    if source.path is not None:
        path = Path(source.path).expanduser()
        path = path if path.is_absolute() else root / path
        if not path.exists():
            if source.hub is not None:
                return _limited(_read_hub(source, where, f"data file not found: {path}", root, origin), source)
            comes_from = f"; the dataset: {origin}" if origin else ""
            raise DataError(f"{where}: data file not found: {path} (data root {root}; set MULTITASK_DATA_ROOT "
                            f"or the experiment's data_root to where the data lives{comes_from})")
    elif source.hub is not None and source.format != "hf_dataset":
        return _limited(_read_hub(source, where, "no local file is named", root, origin), source)
    options = from_dict(reader.options_type, source.options, source=where)
    records = reader.read(path, options)
    if not records:
        raise DataError(f"{where}: {path or 'the dataset'} holds no records (the file is empty or has only blank "
                        f"lines, headers or document markers)")
    return _limited(records, source)


def _limited(records: list[Record], source: SplitSource) -> list[Record]:
    return records if source.limit is None else records[: source.limit]


def _hub_options(source: SplitSource) -> dict[str, Any]:
    """The reader options for hub rows: the split's own, with the hub's on top."""
    return {**source.options, **(source.hub.options if source.hub is not None else {})}


def _read_hub(source: SplitSource, where: str, local: str, root: Path, origin: str) -> list[Record]:
    """The split's hub copy as the records its format gives (see multitask.data.hub)."""
    hub = source.hub
    options = from_dict(READERS.get(source.format).options_type, _hub_options(source), source=where,
                        path="hub.options")
    try:
        records = hub_records(hub, source.format, options)
    except HubLoadError as error:
        raise DataError(f"{where}: {local}, and its hub copy {hub.describe()} could not be loaded ({error}); put the "
                        f"file there (data root {root}; set MULTITASK_DATA_ROOT or the experiment's data_root) or go "
                        f"online so `datasets` can download {hub.name}"
                        + (f"; the dataset: {origin}" if origin else "")) from None
    except DataError as error:
        raise DataError(f"{where}: hub copy {hub.describe()}: {error}") from None
    if not records:
        raise DataError(f"{where}: hub copy {hub.describe()} holds no rows")
    return records


def load_task_data(task: TaskType, root: Path, source: str = "<task>") -> LoadedTask:
    """Read every split, carving validation from train when asked; examples are validated against labels."""
    config = task.config
    records = {split: read_split(s, root, f"{source}: data.{split}", config.description)
               for split, s in _sources(config)}
    if config.data.carve is not None:
        carve = config.data.carve
        group = carve.group_field or "__index__"
        train = records["train"]
        if carve.group_field is None:
            train = [replace(r, fields={**r.fields, "__index__": str(i)}) for i, r in enumerate(train)]
        records["train"], records["validation"] = carve_by_group(train, group, carve.validation_fraction, carve.seed)
    examples = {split: task.examples(split_records) for split, split_records in records.items()}
    for split, split_examples in examples.items():
        if not split_examples:
            raise DataError(f"{source}: data.{split}: no usable examples after reading its records")
    if "train" in examples:
        task.fit_labels(examples["train"])
    elif task.has_labels and not task.labels:
        raise ConfigError(f"{source}: key 'labels': needed when the task has no train split")
    for split, split_examples in examples.items():
        task.check_labels(split_examples, split)
    return LoadedTask(task, source, examples)
