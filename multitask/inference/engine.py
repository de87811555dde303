"""The one place a model turns examples into predictions: tokenisation, length-sorted (mixed-task) batches, the
forward pass under the chosen device and precision, decoding, and metrics for labelled splits.

Evaluation in the trainer, a loaded run's ``predict``/``evaluate`` and the server all go through
:class:`InferenceEngine`. Under data parallelism (training) the batches are sharded over the ranks and the logits
gathered on rank 0, which alone decodes and scores; each feature's logits come from the very batch one process
would have put it in, so the metrics are exactly those of one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from multitask import parallel
from multitask.data.batching import eval_batches
from multitask.data.features import Feature
from multitask.device import autocast
from multitask.encoder_stages import pad_states
from multitask.model import ModelInputs, MultiTaskModel
from multitask.reporting.model import SplitResult
from multitask.tasks.base import TaskType, featurize_examples
from multitask.utils import faults

# A batch takes no input shorter than this share of its longest: padding a sentence to a QA window costs more than
# one more forward pass.
MIN_FILL = 0.5
# Fewer batches than this run without a progress bar: a bar for a handful of requests is noise.
PROGRESS_MIN_BATCHES = 20


@dataclass
class Evaluation:
    result: SplitResult | None  # None when the split has no gold labels (prediction only)
    predictions: list[dict[str, Any]]


def pad_inputs(features: Sequence[Feature], task_ids: Sequence[int], pad_id: int) -> ModelInputs:
    """One padded batch of features that may come from different tasks (some with token types, some without)."""
    longest = max(len(f) for f in features)
    ids = torch.full((len(features), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(features), longest), dtype=torch.long)
    with_types = any(f.token_type_ids is not None for f in features)
    types = torch.zeros((len(features), longest), dtype=torch.long) if with_types else None
    for row, feature in enumerate(features):
        ids[row, : len(feature)] = torch.tensor(feature.input_ids)
        mask[row, : len(feature)] = 1
        if types is not None and feature.token_type_ids is not None:
            types[row, : len(feature)] = torch.tensor(feature.token_type_ids)
    return ModelInputs(ids, mask, torch.tensor(list(task_ids), dtype=torch.long), types)


def _input_key(feature: Feature) -> tuple:
    """What the encoder sees of a feature: its ids, and its token types unless all zero (which is what a feature
    without them gets in a batch, so the two match)."""
    types = feature.token_type_ids or ()
    return tuple(feature.input_ids), tuple(types) if any(types) else ()


@dataclass
class InferenceEngine:
    """A model with its tokenizer and tasks, run on one device in one precision."""

    model: MultiTaskModel
    tokenizer: Any
    tasks: dict[str, TaskType]
    device: torch.device
    precision: str = "fp32"
    batch_size: int = 32
    progress: bool = False

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id or 0

    def featurize(self, task_name: str, examples: list[Any]) -> list[Feature]:
        return featurize_examples(self.tasks[task_name], examples, self.tokenizer, training=False,
                                  progress=self.progress)

    @torch.no_grad()
    def logits(self, features: dict[str, list[Feature]], desc: str = "predicting") -> dict[str, list[np.ndarray]] | None:
        """Logits of every feature of every task, trimmed to the feature's own length.

        All tasks' features are sorted by length together and batched across tasks (each row attends to its own
        task's prefix and goes to its own head), so short inputs of one task share batches with short inputs of
        another. Each rank computes its share of the batches; the result is on rank 0, None on the others.
        """
        self.model.eval()
        items = [(name, feature) for name, task_features in features.items() for feature in task_features]
        task_ids = [self.model.task_id(name) for name, _ in items]
        shared = self._shared_lower_states(items, task_ids)
        batches = parallel.shard(eval_batches([len(f) for _, f in items], self.batch_size, MIN_FILL))
        show = self.progress and len(batches) >= PROGRESS_MIN_BATCHES and parallel.is_main()
        computed: list[tuple[int, np.ndarray]] = []
        for indices in tqdm(batches, desc=desc, unit="batch", disable=None if show else True, leave=False):
            faults.reached("evaluation_batch")
            inputs = pad_inputs([items[i][1] for i in indices], [task_ids[i] for i in indices], self.pad_id)
            if shared is not None:
                boundary, states = shared
                inputs.states = pad_states([states[i] for i in indices], inputs.input_ids.shape[1]).float()
                inputs.boundary = boundary
            with autocast(self.device, self.precision):
                outputs = self.model(inputs.to(self.device))
            for output, rows in outputs.values():
                output = output.float().cpu().numpy()
                for row, position in zip(output, rows.tolist()):
                    index = indices[position]
                    computed.append((index, row[: len(items[index][1])] if row.ndim == 2 else row))
        gathered = parallel.gather_indexed(computed, len(items))
        if gathered is None:
            return None
        per_task: dict[str, list[np.ndarray]] = {name: [] for name in features}
        for (name, _), row in zip(items, gathered):
            per_task[name].append(row)
        return per_task

    def _shared_lower_states(self, items: list[tuple[str, Feature]], task_ids: list[int]):
        """When several tasks get the same input (``analyze``) and their prefixes agree below some layer, the layers
        below it run once per distinct input: (boundary, states per item), else None."""
        if len(set(task_ids)) < 2:
            return None
        boundary = self.model.shared_below(torch.tensor(task_ids))
        distinct: dict[tuple, int] = {}
        owner = [distinct.setdefault(_input_key(f), i) for i, (_, f) in enumerate(items)]
        if boundary == 0 or len(distinct) == len(items):
            return None
        firsts = list(distinct.values())
        computed: dict[int, torch.Tensor] = {}
        for batch in eval_batches([len(items[i][1]) for i in firsts], self.batch_size, MIN_FILL):
            indices = [firsts[b] for b in batch]
            inputs = pad_inputs([items[i][1] for i in indices], [task_ids[i] for i in indices], self.pad_id)
            with autocast(self.device, self.precision):  # kept on the device: the batches pad them there
                states = self.model.encode_lower(inputs.to(self.device), boundary).float()
            for row, index in enumerate(indices):
                computed[index] = states[row, : len(items[index][1])]
        return boundary, [computed[owner[i]] for i in range(len(items))]

    def predict(self, examples: dict[str, list[Any]],
                features: dict[str, list[Feature]] | None = None) -> dict[str, list[dict[str, Any]]]:
        """Prediction records for parsed examples of any of the tasks, in one mixed-task pass (``features``: theirs,
        when already made, e.g. by the server while it checked their size)."""
        if features is None:
            features = {name: self.featurize(name, task_examples) for name, task_examples in examples.items()}
        logits = self.logits(features)
        return {
            name: self._records(name, examples[name], self.tasks[name].decode(examples[name], features[name], logits[name]))
            for name in examples
        }

    def evaluate(self, task_name: str, examples: list[Any], features: list[Feature] | None = None) -> Evaluation | None:
        """Prediction records and, for a labelled split, metrics; None on ranks other than 0."""
        task = self.tasks[task_name]
        features = self.featurize(task_name, examples) if features is None else features
        logits = self.logits({task_name: features}, desc=f"evaluating {task_name}")
        if logits is None:
            return None
        predictions = task.decode(examples, features, logits[task_name])
        rows = self._records(task_name, examples, predictions)
        if not examples or not task.is_labelled(examples):
            return Evaluation(None, rows)
        metrics = task.score(examples, predictions)
        wanted = task.config.metrics or list(metrics.scores)
        scores = {k: v for k, v in metrics.scores.items() if k in wanted or k == task.main_metric()}
        return Evaluation(SplitResult(scores, metrics.details, len(examples)), rows)

    def _records(self, task_name: str, examples: list[Any], predictions: list[Any]) -> list[dict[str, Any]]:
        task = self.tasks[task_name]
        return [task.prediction_record(example, p) for example, p in zip(examples, predictions)]
