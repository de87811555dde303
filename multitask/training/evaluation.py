"""Evaluation during training, and the bookkeeping of the best evaluation so far.

The trainer evaluates through the inference engine (sharded over ranks under data parallelism), selects on the
mean main metric of the first evaluation split, and keeps the weights of the best evaluation: those are what the
checkpoint holds, what the end of training restores, and what early stopping counts from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from multitask.inference import Evaluation, InferenceEngine
from multitask.model import MultiTaskModel
from multitask.runtime import TaskRuntime
from multitask.training.state import trainable_state


def evaluate_tasks(engine: InferenceEngine, tasks: list[TaskRuntime], splits: list[str]) -> dict[str, dict[str, Any]]:
    """Evaluate every task on the given splits it has; returns task -> split -> Evaluation.

    Every rank must call it (evaluation is sharded over ranks); the results are on rank 0, empty elsewhere.
    """
    results: dict[str, dict[str, Any]] = {}
    for runtime in tasks:
        for split in splits:
            if split not in runtime.features:
                continue
            evaluation = engine.evaluate(runtime.name, runtime.examples[split], runtime.features[split])
            if evaluation is not None:
                results.setdefault(runtime.name, {})[split] = evaluation
    return results


def selection_score(tasks: list[TaskRuntime], results: dict[str, dict[str, Evaluation]], split: str) -> float | None:
    """The mean main metric over the tasks scored on ``split``; None when none was (unlabelled, or not rank 0)."""
    scores = [
        r[split].result.scores[t.task.main_metric()]
        for t in tasks if (r := results.get(t.name)) and split in r and r[split].result is not None
    ]
    return sum(scores) / len(scores) if scores else None


def record_scores(tasks: list[TaskRuntime], results: dict[str, dict[str, Evaluation]], step: int,
                  metric_history: dict[str, list[tuple[int, str, float]]], writer: Any, selection_split: str,
                  ) -> list[str]:
    """Each task's main metric into ``metric_history`` and every score into TensorBoard; returns the selection
    split's main scores in words, for the log."""
    main_scores = []
    for task, splits in results.items():
        main = next(t for t in tasks if t.name == task).task.main_metric()
        for split, evaluation in splits.items():
            if evaluation.result is None:
                continue
            value = evaluation.result.scores[main]
            metric_history.setdefault(task, []).append((step, split, value))
            if split == selection_split:
                main_scores.append(f"{task} {main} {value:.4f}")
            for metric, score in evaluation.result.scores.items():
                writer.add_scalar(f"{split}/{task}/{metric}", score, step)
    return main_scores


@dataclass
class BestSoFar:
    """The best evaluation so far: its score, step and trained weights, and the evaluations since that did not
    beat it (for early stopping)."""

    score: float = -math.inf
    step: int | None = None
    state: dict[str, torch.Tensor] | None = None
    bad_evals: int = 0

    def judge(self, score: float | None, step: int, model: MultiTaskModel) -> bool:
        """Whether the evaluation at ``step`` is the new best (kept, with the model's trained weights). One without
        a score (no labelled selection split) always is: the latest weights are the best there is to keep."""
        if score is None or score > self.score:
            self.score = -math.inf if score is None else score
            self.step, self.bad_evals = step, 0
            self.state = trainable_state(model)
            return True
        self.bad_evals += 1
        return False
