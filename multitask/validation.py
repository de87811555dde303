"""`multitask validate`: check task and experiment YAML files, load their data, and summarise each task."""

from __future__ import annotations

from pathlib import Path

from multitask.config import load_config, load_yaml
from multitask.data.root import data_root
from multitask.experiment import ExperimentConfig
from multitask.runtime import load_tasks
from multitask.tasks.base import TaskType
from multitask.tasks.loading import load_task, load_task_data

MAX_LABELS_SHOWN = 12


def describe_task(task: TaskType, source: str, root: Path) -> str:
    loaded = load_task_data(task, root, source)
    sizes = ", ".join(f"{split} {len(examples):,}" for split, examples in loaded.examples.items())
    labels = ""
    if task.labels:
        shown = ", ".join(task.labels[:MAX_LABELS_SHOWN])
        more = f", ... (+{len(task.labels) - MAX_LABELS_SHOWN})" if len(task.labels) > MAX_LABELS_SHOWN else ""
        labels = f" | {len(task.labels)} labels: {shown}{more}"
    return f"{task.config.name:<18} {task.config.type:<15} {sizes}{labels}"


def validate_paths(paths: list[Path], overrides: list[str]) -> str:
    lines = []
    for path in paths:
        data, _ = load_yaml(path)
        if "tasks" in data:  # an experiment: check it, then each of its tasks with the experiment's data root
            experiment = load_config(ExperimentConfig, path, overrides)
            root = data_root(experiment.data_root)
            lines.append(f"{path}: experiment {experiment.name!r} OK ({len(experiment.tasks)} tasks)")
            lines += [describe_task(task, source, root) for _, task, source in load_tasks(experiment, path)]
        else:
            lines.append(describe_task(load_task(path), str(path), data_root()))
    return "\n".join(lines)
