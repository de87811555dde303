"""auto's evidence criterion: LogME from summed statistics equals LogME computed on the rows themselves, it prefers
features that explain the labels, and every task type gives one row per loss term."""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from multitask.errors import ConfigError
from multitask.tasks.classification import ClassificationTask
from multitask.tasks.config import TaskConfig, TaskData
from multitask.tasks.multilabel import MultiLabelTask
from multitask.tasks.ner import IGNORE_INDEX, NerTask
from multitask.tasks.qa import QATask
from multitask.training import transfer_evidence
from multitask.training.transfer_evidence import (FIXED_POINT_STEPS, TOLERANCE, Statistics, log_evidence,
                                                   scored_features)


def logme_on_rows(x: np.ndarray, y: np.ndarray) -> float:
    """LogME as You et al. (2021) write it: the SVD of the rows, the posterior mean and the residual computed
    explicitly (a different path from the module's eigendecomposition of the summed x'x)."""
    rows, dim = x.shape
    u, singular, vt = np.linalg.svd(x, full_matrices=False)
    sigma = np.concatenate([singular**2, np.zeros(dim - len(singular))])  # x'x's eigenvalues, zeros included
    evidences = []
    for column in y.T:
        alpha, beta = 1.0, 1.0
        for _ in range(FIXED_POINT_STEPS):
            ratio = alpha / beta
            gamma = float((sigma / (sigma + ratio)).sum())
            mean = vt.T @ (singular * (u.T @ column) / (singular**2 + ratio))  # (x'x + ratio I)^-1 x'y
            weight_norm = float(mean @ mean)
            residual = float(((column - x @ mean) ** 2).sum())
            alpha, beta = gamma / (weight_norm + 1e-5), (rows - gamma) / (residual + 1e-5)
            if abs(alpha / beta - ratio) / ratio < TOLERANCE:
                break
        evidences.append((rows / 2 * math.log(beta) + dim / 2 * math.log(alpha) - rows / 2 * math.log(2 * math.pi)
                          - beta / 2 * residual - alpha / 2 * weight_norm
                          - 0.5 * float(np.log(alpha + beta * sigma).sum())) / rows)
    return float(np.mean(evidences))


def summed(x: np.ndarray, y: np.ndarray, parts: int) -> Statistics:
    stats = Statistics.empty(x.shape[1], y.shape[1])
    for rows in np.array_split(np.arange(len(x)), parts):
        stats.add(x[rows], y[rows])
    return stats


@pytest.mark.parametrize("rows", [300, 40])  # more rows than features, and fewer (100 examples, hidden 384)
def test_evidence_from_summed_statistics_is_logme_on_the_rows(rows):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, 16))
    labels = (x[:, 0] + 0.5 * rng.normal(size=rows) > 0).astype(int) + (x[:, 1] > 1)
    y = np.eye(3)[labels]
    assert log_evidence(summed(x, y, parts=7), [0, 1, 2]) == pytest.approx(logme_on_rows(x, y), rel=1e-7, abs=1e-9)
    # Columns are averaged: the mean of each column's own evidence.
    each = [log_evidence(summed(x, y, parts=1), [c]) for c in range(3)]
    assert log_evidence(summed(x, y, parts=1), [0, 2]) == pytest.approx((each[0] + each[2]) / 2, rel=1e-12)


def test_features_that_explain_the_labels_score_higher_than_features_that_do_not():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, size=200)
    y = np.eye(4)[labels]
    informative = np.eye(4)[labels] @ rng.normal(size=(4, 12)) + 0.3 * rng.normal(size=(200, 12))
    noise = rng.normal(size=(200, 12))
    assert log_evidence(summed(informative, y, 1), [0, 1, 2, 3]) > log_evidence(summed(noise, y, 1), [0, 1, 2, 3])


def test_each_task_type_gives_one_row_per_loss_term_and_its_targets_as_columns():
    hidden = torch.arange(5 * 3, dtype=torch.float).reshape(5, 3)
    data = TaskData()
    classes = ClassificationTask(TaskConfig(name="c", type="classification", data=data, labels=["a", "b", "c"]))
    x, y = classes.evidence_rows(hidden[0], torch.tensor(2))
    assert torch.equal(x, hidden[:1]) and torch.equal(y, torch.tensor([[0.0, 0.0, 1.0]]))

    multi = MultiLabelTask(TaskConfig(name="m", type="multilabel", data=data, labels=["a", "b"]))
    x, y = multi.evidence_rows(hidden[1], torch.tensor([1.0, 0.0]))
    assert torch.equal(x, hidden[1:2]) and torch.equal(y, torch.tensor([[1.0, 0.0]]))

    ner = NerTask(TaskConfig(name="n", type="ner", data=data, labels=["O", "B-PER", "I-PER"]))
    tags = torch.tensor([IGNORE_INDEX, 1, IGNORE_INDEX, 2, 0])  # [CLS], subword continuations: no loss term
    x, y = ner.evidence_rows(hidden, tags)
    assert torch.equal(x, hidden[[1, 3, 4]]) and torch.equal(y, torch.eye(3)[[1, 2, 0]])

    qa = QATask(TaskConfig(name="q", type="qa", data=data, max_length=16))
    x, y = qa.evidence_rows(hidden, torch.tensor([2, 3, 4]))  # answer at 2..3, 4 positions before the padding
    assert torch.equal(x, hidden[:4])
    assert torch.equal(y, torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    x, y = qa.evidence_rows(hidden, torch.tensor([0, 0, 5]))  # no answer: [CLS] starts and ends it
    assert torch.equal(y[0], torch.tensor([1.0, 1.0])) and y[1:].sum() == 0


@dataclass
class Window:
    example_index: int
    length: int

    def __len__(self) -> int:
        return self.length


def test_the_evidence_scores_a_seeded_sample_of_whole_examples_shortest_first(monkeypatch):
    # Two windows per example (a long QA context), of lengths that do not follow the example order.
    features = [Window(e, 5 + (7 * e + w) % 11) for e in range(30) for w in range(2)]
    assert scored_features(features, seed=3) == sorted(features, key=len)  # fewer than the cap: every example
    monkeypatch.setattr(transfer_evidence, "MAX_EXAMPLES", 10)
    scored = scored_features(features, seed=3)
    kept = {f.example_index for f in scored}
    assert len(kept) == 10 and len(scored) == 20  # both windows of every sampled example
    assert [len(f) for f in scored] == sorted(len(f) for f in scored)
    assert scored == scored_features(features, seed=3) and kept != {f.example_index for f in scored_features(
        features, seed=4)}
    assert transfer_evidence.scored_examples(30) == 10 and transfer_evidence.scored_examples(6) == 6


@dataclass
class LabelledWindow(Window):
    target: list | None = None


def test_training_examples_without_any_label_are_refused_in_one_line(monkeypatch):
    """Multi-label examples that all have no label leave nothing to score by."""
    runtime = SimpleNamespace(name="tags", features={"train": [LabelledWindow(0, 3, target=[0.0, 0.0])]})
    prefix = torch.nn.Linear(1, 1)
    model = SimpleNamespace(prefix_bank=SimpleNamespace(encoders={"task_tags": prefix}), task_id=lambda name: 0)
    monkeypatch.setattr(transfer_evidence, "feature_statistics",
                        lambda *args: summed(np.ones((1, 3)), np.zeros((1, 2)), parts=1))
    with pytest.raises(ConfigError, match="^task tags: prefix.transfer: auto: no training example has a label"):
        transfer_evidence.evidence_of(model, runtime, "task_tags", {"none": None}, "cpu", "fp32", 0, seed=1)
