"""Task types: each module defines one type and registers it in TASK_TYPES with one line."""

from multitask.data.features import Feature
from multitask.tasks import classification, multilabel, ner, qa  # noqa: F401  (registration side effects)
from multitask.tasks.base import TASK_TYPES, Batch, TaskType

__all__ = ["TASK_TYPES", "Batch", "Feature", "TaskType"]
