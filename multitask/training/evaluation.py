"""Evaluate one task on one split: batches -> logits per feature -> predictions -> metrics.

Under data parallelism the batches are sharded over the ranks and the logits gathered on rank 0, which alone
decodes and scores; each feature's logits come from the very batch one process would have put it in, so the
metrics are exactly those of one process.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from multitask.model import ModelInputs, MultiTaskModel
from multitask.reporting.model import SplitResult
from multitask.tasks.base import Batch, Feature, TaskType
from multitask.training import distributed
from multitask.training.batching import eval_batches
from multitask.training.precision import resolve_precision
from multitask.utils import faults


@dataclass
class Evaluation:
    result: SplitResult | None  # None when the split has no gold labels (prediction only)
    predictions: list[dict[str, Any]]


def autocast(device: torch.device, precision: str):
    precision = resolve_precision(precision, device)[0]
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_inputs(batch: Batch, task_id: int, device: torch.device) -> ModelInputs:
    task_ids = torch.full((batch.input_ids.shape[0],), task_id, dtype=torch.long)
    return ModelInputs(batch.input_ids, batch.attention_mask, task_ids, batch.token_type_ids).to(device)


@torch.no_grad()
def feature_logits(
    model: MultiTaskModel, task: TaskType, features: list[Feature], batch_size: int, device: torch.device,
    precision: str, pad_id: int,
) -> list[np.ndarray] | None:
    """Logits of every feature, trimmed to the feature's own length; batches are length-sorted (little padding).

    Each rank computes its share of the batches; the full list comes back on rank 0, None on the other ranks.
    """
    model.eval()
    name = task.config.name
    task_id = model.task_id(name)
    computed: list[tuple[int, np.ndarray]] = []
    for indices in distributed.shard(eval_batches([len(f) for f in features], batch_size)):
        faults.reached("evaluation_batch")
        batch = task.collate([features[i] for i in indices], pad_id)
        with autocast(device, precision):
            output, _ = model(to_inputs(batch, task_id, device))[name]
        output = output.float().cpu().numpy()
        for row, index in enumerate(indices):
            computed.append((index, output[row, : len(features[index])] if output.ndim == 3 else output[row]))
    return distributed.gather_indexed(computed, len(features))


def evaluate(
    model: MultiTaskModel, task: TaskType, examples: list[Any], features: list[Feature], batch_size: int,
    device: torch.device, precision: str, pad_id: int,
) -> Evaluation | None:
    """Predictions and (for labelled splits) metrics; None on ranks other than 0, which only contribute logits."""
    logits = feature_logits(model, task, features, batch_size, device, precision, pad_id)
    if logits is None:
        return None
    predictions = task.decode(examples, features, logits)
    rows = [task.prediction_record(example, p) for example, p in zip(examples, predictions)]
    if not examples or not task.is_labelled(examples):
        return Evaluation(None, rows)
    metrics = task.score(examples, predictions)
    wanted = task.config.metrics or list(metrics.scores)
    scores = {k: v for k, v in metrics.scores.items() if k in wanted or k == task.main_metric()}
    return Evaluation(SplitResult(scores, metrics.details, len(examples)), rows)
