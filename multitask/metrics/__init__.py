"""Evaluation metrics for every task type, each returning a :class:`MetricResult`."""

from multitask.metrics.classification import classification_metrics, multilabel_metrics
from multitask.metrics.ner import ner_metrics
from multitask.metrics.qa import normalize_answer, squad_metrics
from multitask.metrics.result import MetricResult

__all__ = [
    "MetricResult",
    "classification_metrics",
    "multilabel_metrics",
    "ner_metrics",
    "normalize_answer",
    "squad_metrics",
]
