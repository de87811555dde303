"""Entity-level NER metrics via seqeval, in its default (conlleval-compatible) lenient mode."""

from __future__ import annotations

from seqeval.metrics import accuracy_score, classification_report, f1_score, precision_score, recall_score

from multitask.metrics.result import MetricResult

_AVERAGE_ROWS = {"micro avg", "macro avg", "weighted avg"}


def ner_metrics(gold: list[list[str]], predicted: list[list[str]]) -> MetricResult:
    """Micro precision/recall/F1 over entities, token accuracy, and per-entity-type scores (IOB2 tags).

    Sentences are checked pairwise first: seqeval flattens its input, so one misaligned sentence
    would otherwise shift every later tag and produce plausible-looking wrong numbers.
    """
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold sentences but {len(predicted)} predicted sentences")
    if not gold:
        raise ValueError("nothing to score: no sentences")
    for index, (gold_tags, predicted_tags) in enumerate(zip(gold, predicted)):
        if len(gold_tags) != len(predicted_tags):
            raise ValueError(
                f"sentence {index}: {len(gold_tags)} gold tags but {len(predicted_tags)} predicted tags"
            )
    report = classification_report(gold, predicted, output_dict=True, zero_division=0)
    per_type = {
        name: {
            "precision": float(row["precision"]),
            "recall": float(row["recall"]),
            "f1": float(row["f1-score"]),
            "support": int(row["support"]),
        }
        for name, row in report.items()
        if name not in _AVERAGE_ROWS
    }
    return MetricResult(
        scores={
            "precision": float(precision_score(gold, predicted, zero_division=0)),
            "recall": float(recall_score(gold, predicted, zero_division=0)),
            "f1": float(f1_score(gold, predicted, zero_division=0)),
            "accuracy": float(accuracy_score(gold, predicted)),
        },
        details={"per_type": per_type},
    )
