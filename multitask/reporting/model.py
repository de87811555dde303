"""The in-memory evaluation report and its JSON form.

Every writer (JSON, Markdown, HTML, plots) reads the same ``RunReport``, so a number can never
differ between formats. JSON keeps raw fractions; only human-facing formats turn them into
percentages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SplitResult:
    """One task evaluated on one split: headline scores plus format-specific breakdowns."""

    scores: dict[str, float]
    details: dict[str, Any]
    num_examples: int


@dataclass
class TaskReport:
    """Everything reported about one task, across splits and over training."""

    name: str
    type: str
    main_metric: str
    splits: dict[str, SplitResult]
    metric_history: list[tuple[int, str, float]] = field(default_factory=list)
    loss_history: list[tuple[int, float]] = field(default_factory=list)

    def main_score(self, split: str) -> float | None:
        """The main metric on ``split``, or None when the split or the metric was not evaluated."""
        result = self.splits.get(split)
        return None if result is None else result.scores.get(self.main_metric)


@dataclass
class RunReport:
    """All tasks of one training/evaluation run, plus run-level metadata."""

    tasks: dict[str, TaskReport]
    meta: dict[str, Any] = field(default_factory=dict)

    def split_names(self) -> list[str]:
        """Every split seen in any task, in first-seen order, so tables get stable columns."""
        names: dict[str, None] = {}
        for task in self.tasks.values():
            names.update(dict.fromkeys(task.splits))
        return list(names)

    def aggregate(self) -> dict[str, float]:
        """Split -> mean main metric over the tasks that report it on that split.

        Tasks missing a split are left out rather than counted as zero, so adding a task that
        has no test set does not drag the test average down.
        """
        means: dict[str, float] = {}
        for split in self.split_names():
            values = [s for task in self.tasks.values() if (s := task.main_score(split)) is not None]
            if values:
                means[split] = sum(values) / len(values)
        return means


def report_to_json(report: RunReport) -> dict[str, Any]:
    """A JSON-able dict of the report; ``aggregate`` is derived and ignored when read back."""
    return {
        "tasks": {name: _task_to_json(task) for name, task in report.tasks.items()},
        "aggregate": report.aggregate(),
        "meta": dict(report.meta),
    }


def report_from_json(data: dict[str, Any]) -> RunReport:
    """Inverse of ``report_to_json``; raises KeyError/TypeError/ValueError on a malformed dict."""
    tasks = {name: _task_from_json(name, body) for name, body in data["tasks"].items()}
    return RunReport(tasks=tasks, meta=dict(data.get("meta", {})))


def _task_to_json(task: TaskReport) -> dict[str, Any]:
    return {
        "type": task.type,
        "main_metric": task.main_metric,
        "metrics": {split: dict(r.scores) for split, r in task.splits.items()},
        "details": {split: r.details for split, r in task.splits.items()},
        "num_examples": {split: r.num_examples for split, r in task.splits.items()},
        "history": {
            "metric": [[step, split, value] for step, split, value in task.metric_history],
            "loss": [[step, loss] for step, loss in task.loss_history],
        },
    }


def _task_from_json(name: str, body: dict[str, Any]) -> TaskReport:
    details = body.get("details", {})
    counts = body.get("num_examples", {})
    splits = {
        split: SplitResult(
            scores={k: float(v) for k, v in scores.items()},
            details=details.get(split, {}),
            num_examples=int(counts.get(split, 0)),
        )
        for split, scores in body["metrics"].items()
    }
    history = body.get("history", {})
    return TaskReport(
        name=name,
        type=body["type"],
        main_metric=body["main_metric"],
        splits=splits,
        metric_history=[(int(step), str(split), float(v)) for step, split, v in history.get("metric", [])],
        loss_history=[(int(step), float(loss)) for step, loss in history.get("loss", [])],
    )
