"""Score ``auto``'s candidate prefixes without training them: the evidence of a linear head on their features.

A short trial (:func:`multitask.training.prefix_transfer.score_candidates`) trains every candidate, which costs
more than the new task's own training when there is little data, and still ranks helpful sources poorly. LogME
(You et al., 2021) asks a cheaper question: with this prefix in place, how well do the frozen features that the
new head will read explain the training labels? It is the log marginal likelihood of a Bayesian linear model
from the features to the targets, its two precisions fitted by a fixed point, so it needs no held-back slice and
no learning rate: one forward pass per candidate over the training examples, and eigendecompositions of a
hidden-size Gram matrix. It put the best source of docs/growing.md's sweep first at 10 of 11 target-seeds.

The score is not bootstrapped. Resampling the examples changes how many there are, or duplicates them, and either
moves the evidence of features of different rank differently, so resampled rankings disagreed with the whole
sample's (on WNUT-17 a fresh start matched CoNLL-2003's prefix in 70% of bootstrap resamples, though it is lower
on the whole sample and every seed of the sweep trains it 10 F1 lower).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch

from multitask.device import autocast
from multitask.errors import ConfigError
from multitask.model import ModelInputs

FIXED_POINT_STEPS, TOLERANCE = 50, 1e-4
BATCH_SIZE = 64
# The evidence is scored on at most this many training examples (a seeded sample), so that on a large training set
# scoring stays a small share of the run. With 1,000 examples and the demo's three prefixes, 500 picked what all
# 1,000 did on WNUT-17, BC5CDR and TREC, in 17, 24 and 9 s (all: 28, 40 and 17 s; the runs take 265 to 400 s).
MAX_EXAMPLES = 500


@dataclass
class Statistics:
    """What the evidence needs of rows ``x`` (features) and ``y`` (targets, one column each): x'x, x'y, the
    column sums of y*y, and the number of rows, summed batch by batch."""

    gram: np.ndarray
    cross: np.ndarray
    target_squares: np.ndarray
    rows: float = 0.0

    @classmethod
    def empty(cls, features: int, targets: int) -> Statistics:
        return cls(np.zeros((features, features)), np.zeros((features, targets)), np.zeros(targets))

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        self.gram += x.T @ x
        self.cross += x.T @ y
        self.target_squares += (y * y).sum(axis=0)
        self.rows += len(x)


def log_evidence(stats: Statistics, columns: list[int]) -> float:
    """LogME: the log evidence per row of a Bayesian linear model from the features to each target column (prior
    precision alpha on the weights, noise precision beta, both fitted), averaged over ``columns``. Computed from the
    eigendecomposition of x'x, so its cost does not grow with the number of rows."""
    eigenvalues, vectors = np.linalg.eigh(stats.gram)
    eigenvalues = np.clip(eigenvalues, 0.0, None)
    dim, rows = len(eigenvalues), stats.rows
    nonzero = eigenvalues > eigenvalues.max() * 1e-10 if eigenvalues.max() > 0 else eigenvalues > 0
    projected = vectors.T @ stats.cross  # V'x'y: its square over an eigenvalue is (U'y)^2
    evidences = []
    for column in columns:
        squares = np.where(nonzero, projected[:, column] ** 2 / np.where(nonzero, eigenvalues, 1.0), 0.0)
        outside = max(float(stats.target_squares[column] - squares.sum()), 0.0)  # y beyond the features' span
        alpha, beta = 1.0, 1.0
        for _ in range(FIXED_POINT_STEPS):
            ratio = alpha / beta
            gamma = float((eigenvalues / (eigenvalues + ratio)).sum())
            weight_norm = float((eigenvalues * squares / (eigenvalues + ratio) ** 2).sum())
            residual = float((squares / (1 + eigenvalues / ratio) ** 2).sum()) + outside
            alpha = gamma / (weight_norm + 1e-5)
            beta = max(rows - gamma, 1e-5) / (residual + 1e-5)
            if abs(alpha / beta - ratio) / ratio < TOLERANCE:
                break
        evidence = (rows / 2 * math.log(beta) + dim / 2 * math.log(alpha) - rows / 2 * math.log(2 * math.pi)
                    - beta / 2 * residual - alpha / 2 * weight_norm
                    - 0.5 * float(np.log(alpha + beta * eigenvalues).sum()))
        evidences.append(evidence / rows)
    return float(np.mean(evidences))


def scored_features(features: list, seed: int) -> list:
    """The training features of at most MAX_EXAMPLES examples (a seeded sample; all of them when there are fewer),
    shortest first so that batches pad little."""
    examples = sorted({feature.example_index for feature in features})
    kept = set(random.Random(seed).sample(examples, MAX_EXAMPLES) if len(examples) > MAX_EXAMPLES else examples)
    return sorted((feature for feature in features if feature.example_index in kept), key=len)


def scored_examples(size: int) -> int:
    """How many of ``size`` training examples the evidence is scored on."""
    return min(size, MAX_EXAMPLES)


@torch.no_grad()
def feature_statistics(model, runtime, features: list, task_id: int, device, precision: str, pad_id: int
                       ) -> Statistics:
    """The statistics of the head's inputs against the targets (``task.evidence_rows``) over ``features``, with the
    model as it stands (the candidate's prefix in place)."""
    head = model.heads[runtime.name]
    captured: list[torch.Tensor] = []
    hook = head.layers.register_forward_pre_hook(lambda module, inputs: captured.append(inputs[0]))
    stats = None
    model.eval()
    try:
        for start in range(0, len(features), BATCH_SIZE):
            batch = runtime.task.collate(features[start : start + BATCH_SIZE], pad_id)
            captured.clear()
            with autocast(device, precision):
                model(ModelInputs.of_task(batch, task_id).to(device))
            # One copy of the batch's head inputs to the host, not one per example.
            rows = [runtime.task.evidence_rows(inputs, target)
                    for inputs, target in zip(captured[0].float().cpu(), batch.targets)]
            x = torch.cat([x for x, _ in rows]).double().numpy()
            y = torch.cat([y for _, y in rows]).double().numpy()
            stats = stats or Statistics.empty(x.shape[1], y.shape[1])
            stats.add(x, y)
    finally:
        hook.remove()
    return stats


def evidence_of(model, runtime, target_name: str, starts: dict[str, torch.Tensor | None], device, precision: str,
                pad_id: int, seed: int) -> dict[str, float]:
    """Each start's evidence on the training examples (:func:`scored_features`); the new prefix is back as it was
    afterwards."""
    if not runtime.features["train"] or runtime.features["train"][0].target is None:
        raise ConfigError(f"task {runtime.name}: prefix.transfer: auto needs labelled training examples")
    features = scored_features(runtime.features["train"], seed)
    prefix = model.prefix_bank.encoders[target_name]
    saved = {key: value.clone() for key, value in prefix.state_dict().items()}
    task_id = model.task_id(runtime.name)
    statistics = {}
    try:
        for name, kv in starts.items():
            prefix.load_state_dict(saved)
            if kv is not None:
                prefix.set_initial(kv.to(device))
            statistics[name] = feature_statistics(model, runtime, features, task_id, device, precision, pad_id)
    finally:
        prefix.load_state_dict(saved)
    # Labels absent from the training examples (every target 0) say nothing about a candidate.
    first = next(iter(statistics.values()))
    columns = [int(c) for c in np.flatnonzero(first.target_squares > 0)] if first is not None else []
    if not columns:
        raise ConfigError(f"task {runtime.name}: prefix.transfer: auto: no training example has a label to score "
                          f"the candidates by; name the source prefix, or set prefix.transfer_criterion: metric")
    return {name: log_evidence(stats, columns) for name, stats in statistics.items()}
