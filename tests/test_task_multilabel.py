"""Multi-label task type: label parsing, multi-hot targets, BCE loss, threshold decoding, metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from multitask.data.records import Record
from multitask.errors import DataError
from multitask.tasks.classification import TextExample
from multitask.tasks.config import TaskConfig, TaskData
from multitask.tasks.multilabel import MultiLabelOptions, MultiLabelTask, parse_labels
from tests.tiny import tiny_tokenizer

LABELS = ["fun", "love", "plot"]


def make_task(threshold: float = 0.5, separator: str = ",", labels: list[str] | None = LABELS) -> MultiLabelTask:
    config = TaskConfig(name="tags", type="multilabel", data=TaskData(), max_length=16, labels=labels)
    return MultiLabelTask(config, MultiLabelOptions(label_separator=separator, threshold=threshold))


def test_label_parsing():
    assert parse_labels(" fun, love ,,fun ", ",", "x") == ["fun", "love"]
    assert parse_labels("fun|plot", "|", "x") == ["fun", "plot"]
    assert parse_labels(["plot", " fun"], ",", "x") == ["plot", "fun"]
    assert parse_labels("", ",", "x") == []
    with pytest.raises(DataError, match=r"a.csv:3: labels must be a list or a ','-separated string, got int"):
        parse_labels(3, ",", "a.csv:3")


def test_records_use_the_separator_option():
    task = make_task(separator="|", labels=None)
    record = Record({"text": "fun movie", "labels": "love|fun", "id": 7}, "train.csv:2")
    parsed = task.example_from_record(record, 0)
    assert parsed == TextExample("7", "fun movie", None, ["love", "fun"])
    task.fit_labels([parsed])
    assert task.labels == ["fun", "love"]
    unlabelled = task.example_from_record(Record({"text": "a film"}, "test.csv:2"), 1)
    assert unlabelled.label is None
    assert task.is_labelled([parsed, TextExample("1", "x", None, [])])
    assert not task.is_labelled([parsed, unlabelled])


def test_options_are_validated():
    with pytest.raises(ValueError, match="threshold"):
        MultiLabelOptions(threshold=1.5)
    with pytest.raises(ValueError, match="label_separator"):
        MultiLabelOptions(label_separator="")
    assert make_task().options.threshold == 0.5
    config = TaskConfig(name="tags", type="multilabel", data=TaskData())
    assert MultiLabelTask(config).options == MultiLabelOptions()


def test_multi_hot_targets_and_bce_loss(tmp_path):
    task = make_task()
    examples = [TextExample("0", "fun movie", None, ["plot", "fun"]), TextExample("1", "bad film", None, [])]
    features = task.featurize(examples, tiny_tokenizer(tmp_path), training=True)
    batch = task.collate(features, pad_id=0)
    assert batch.targets.dtype == torch.float
    assert batch.targets.tolist() == [[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, -3.0]])
    expected = torch.nn.functional.binary_cross_entropy(torch.sigmoid(logits), batch.targets)
    torch.testing.assert_close(task.loss(logits, batch.targets), expected)
    unlabelled = task.featurize([TextExample("2", "a film")], tiny_tokenizer(tmp_path), training=False)
    assert task.collate(unlabelled, pad_id=0).targets is None


def test_threshold_decoding():
    logits = [np.array([2.0, -2.0, 0.1]), np.array([-1.0, -500.0, -0.2])]
    predictions = make_task().decode([], [], logits)
    assert [p["labels"] for p in predictions] == [["fun", "plot"], []]
    assert predictions[0]["probabilities"]["fun"] == pytest.approx(1 / (1 + np.exp(-2.0)))
    assert predictions[1]["probabilities"]["love"] == 0.0
    assert [p["labels"] for p in make_task(threshold=0.6).decode([], [], logits)] == [["fun"], []]


def test_scores_on_a_hand_case():
    task = make_task()
    examples = [TextExample("0", "a", None, ["fun", "love"]), TextExample("1", "b", None, ["plot"])]
    predictions = [{"labels": ["fun"]}, {"labels": ["plot"]}]
    scores = task.score(examples, predictions).scores
    # tp=2, fp=0, fn=1 -> P=1, R=2/3; per label F1: fun 1, love 0, plot 1.
    assert scores == pytest.approx({"micro_f1": 0.8, "macro_f1": 2 / 3, "exact_match": 0.5})
    record = task.prediction_record(examples[0], {"labels": ["fun"], "probabilities": {}})
    assert record == {"id": "0", "text": "a", "gold": ["fun", "love"], "labels": ["fun"], "probabilities": {}}
