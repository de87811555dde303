"""Single- and multi-label classification metrics, computed by scikit-learn so numbers match the literature."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support
from sklearn.preprocessing import MultiLabelBinarizer

from multitask.metrics.result import MetricResult


def _check_known(values: Iterable[str], labels: Sequence[str], side: str) -> None:
    """An unknown label is a data/decoding bug; scikit-learn would silently drop it from per-class scores."""
    unknown = sorted(set(values) - set(labels))
    if unknown:
        raise ValueError(f"{side} labels not in the label set: {', '.join(map(repr, unknown))}")


def _per_class(labels: Sequence[str], precision, recall, f1, support) -> dict[str, dict[str, float]]:
    return {
        label: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, label in enumerate(labels)
    }


def classification_metrics(gold: list[str], predicted: list[str], labels: list[str]) -> MetricResult:
    """Accuracy, macro-F1 and weighted-F1, with per-class scores and a confusion matrix over ``labels``.

    Macro-F1 averages over the labels that occur in ``gold`` or ``predicted`` (scikit-learn's default),
    so a class missing from a small dev set does not count as a zero; such a class is still listed,
    with zeros, in the per-class details and the confusion matrix.
    """
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold labels but {len(predicted)} predictions")
    if not gold:
        raise ValueError("nothing to score: no examples")
    _check_known(gold, labels, "gold")
    _check_known(predicted, labels, "predicted")
    precision, recall, f1, support = precision_recall_fscore_support(
        gold, predicted, labels=labels, zero_division=0
    )
    matrix = confusion_matrix(gold, predicted, labels=labels)
    return MetricResult(
        scores={
            "accuracy": float(accuracy_score(gold, predicted)),
            "macro_f1": float(f1_score(gold, predicted, average="macro", zero_division=0)),
            "weighted_f1": float(f1_score(gold, predicted, average="weighted", zero_division=0)),
        },
        details={
            "per_class": _per_class(labels, precision, recall, f1, support),
            "confusion_matrix": {"labels": list(labels), "matrix": matrix.astype(int).tolist()},
        },
    )


def multilabel_metrics(gold: list[list[str]], predicted: list[list[str]], labels: list[str]) -> MetricResult:
    """Micro-F1, macro-F1 and exact match (subset accuracy) for label sets.

    As in :func:`classification_metrics`, macro-F1 averages over labels that occur in gold or
    predicted sets; every label in ``labels`` appears in the per-class details.
    """
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold label sets but {len(predicted)} predictions")
    if not gold:
        raise ValueError("nothing to score: no examples")
    _check_known((label for row in gold for label in row), labels, "gold")
    _check_known((label for row in predicted for label in row), labels, "predicted")
    binarizer = MultiLabelBinarizer(classes=list(labels))
    y_true = binarizer.fit_transform(gold)
    y_pred = binarizer.transform(predicted)
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, zero_division=0)
    present = np.flatnonzero(y_true.any(axis=0) | y_pred.any(axis=0))
    macro = float(f1[present].mean()) if present.size else 0.0
    return MetricResult(
        scores={
            "micro_f1": float(f1_score(y_true, y_pred, average="micro", zero_division=0)),
            "macro_f1": macro,
            "exact_match": float(accuracy_score(y_true, y_pred)),
        },
        details={"per_class": _per_class(labels, precision, recall, f1, support)},
    )
