"""NER task type: first-subword alignment, windows that keep every word, decoding, IOB2 repair, loss, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from multitask.data.records import Record
from multitask.errors import ConfigError, DataError
from multitask.heads import HEADS, HeadConfig
from multitask.model import ModelInputs, MultiTaskModel
from multitask.tasks.config import TaskConfig, TaskData
from multitask.tasks.ner import IGNORE_INDEX, NerTask, TaggingExample
from tests.tiny import tiny_encoder, tiny_tokenizer

LABELS = ["B-LOC", "B-PER", "I-LOC", "I-PER", "O"]
# An entity's score under one-hot logits of 1.0: each word's tag has probability e / (e + 4).
ONE_HOT = pytest.approx(np.e / (np.e + len(LABELS) - 1))


@pytest.fixture
def tokenizer(tmp_path):
    tokenizer = tiny_tokenizer(tmp_path)
    assert tokenizer.tokenize("unbelievable") == ["un", "##believ", "##able"], "tiny vocabulary not loaded"
    return tokenizer


def make_task(max_length: int = 32, labels: list[str] | None = LABELS) -> NerTask:
    return NerTask(TaskConfig(name="ner", type="ner", data=TaskData(), max_length=max_length, labels=labels))


def example(words: str, tags: str | None, guid: str = "0") -> TaggingExample:
    return TaggingExample(guid, words.split(), None if tags is None else tags.split())


def gold_logits(task: NerTask, examples, features) -> list[np.ndarray]:
    """Logits one-hot on each word's gold tag at its first subword, zero elsewhere."""
    logits = []
    for feature in features:
        scores = np.zeros((len(feature), len(task.labels)), dtype=np.float32)
        for word, position in feature.word_positions:
            scores[position, task.labels.index(examples[feature.example_index].tags[word])] = 1.0
        logits.append(scores)
    return logits


def predicted_logits(task: NerTask, features, tags: list[str]) -> list[np.ndarray]:
    """Logits of one single-feature sentence that predict ``tags`` word by word."""
    (feature,) = features
    scores = np.zeros((len(feature), len(task.labels)), dtype=np.float32)
    for word, position in feature.word_positions:
        scores[position, task.labels.index(tags[word])] = 1.0
    return [scores]


def test_only_first_subword_is_labelled(tokenizer):
    task = make_task()
    (feature,) = task.featurize([example("unbelievable paris", "O B-LOC")], tokenizer, training=True)
    assert tokenizer.convert_ids_to_tokens(feature.input_ids) == [
        "[CLS]", "un", "##believ", "##able", "paris", "[SEP]"]
    assert feature.target == [IGNORE_INDEX, LABELS.index("O"), IGNORE_INDEX, IGNORE_INDEX, LABELS.index("B-LOC"),
                              IGNORE_INDEX]
    assert feature.word_positions == [(0, 1), (1, 4)]


def test_long_sentence_windows_cover_every_word_once(tokenizer):
    task = make_task(max_length=8)  # 6 subwords per window
    words = "john smith was born in paris unbelievable movies of london and the city of paris is fun"
    tags = "B-PER I-PER O O O B-LOC O O O B-LOC O O O O B-LOC O O"
    sentence = example(words, tags)
    examples = [example("the film", "O O"), sentence]
    features = task.featurize(examples, tokenizer, training=True)
    windows = [f for f in features if f.example_index == 1]
    assert len(windows) > 2
    assert all(len(f) <= 8 for f in features)
    covered = [word for f in windows for word, _ in f.word_positions]
    assert covered == list(range(len(sentence.tokens)))
    predictions = task.decode(examples, features, gold_logits(task, examples, features))
    assert [p["tags"] for p in predictions] == [e.tags for e in examples]


def test_word_longer_than_window_keeps_its_first_subwords(tokenizer):
    task = make_task(max_length=8)
    sentence = example("paris unbelievableingedlyer london", "B-LOC O B-LOC")  # middle word: 7 subwords
    features = task.featurize([sentence], tokenizer, training=True)
    assert [f.word_positions for f in features] == [[(0, 1)], [(1, 1)], [(2, 1)]]
    assert tokenizer.convert_ids_to_tokens(features[1].input_ids) == [
        "[CLS]", "un", "##believ", "##able", "##ing", "##ed", "##ly", "[SEP]"]
    assert task.decode([sentence], features, gold_logits(task, [sentence], features))[0]["tags"] == sentence.tags


def test_words_without_subwords_are_kept_and_predicted_o(tokenizer):
    task = make_task()
    sentence = TaggingExample("0", ["paris", " ", "\u200b", "london"], ["B-LOC", "O", "B-PER", "B-LOC"])
    (feature,) = task.featurize([sentence], tokenizer, training=True)
    assert [word for word, _ in feature.word_positions] == [0, 3]
    (prediction,) = task.decode([sentence], [feature], gold_logits(task, [sentence], [feature]))
    assert prediction["tags"] == ["B-LOC", "O", "O", "B-LOC"]
    assert task.score([sentence], [prediction]).scores["recall"] == pytest.approx(2 / 3)


def test_chinese_characters(tokenizer):
    task = make_task()
    raw = task.example_from_raw({"text": "北京 是中国的首都"}, 0)
    assert raw.tokens == list("北京是中国的首都")
    sentence = TaggingExample("0", raw.tokens, ["B-LOC", "I-LOC", "O", "B-LOC", "I-LOC", "O", "O", "O"])
    features = task.featurize([sentence], tokenizer, training=True)
    (prediction,) = task.decode([sentence], features, gold_logits(task, [sentence], features))
    assert prediction["tags"] == sentence.tags
    assert prediction["entities"] == [
        {"type": "LOC", "start": 0, "end": 2, "text": "北京", "score": ONE_HOT},
        {"type": "LOC", "start": 3, "end": 5, "text": "中国", "score": ONE_HOT},
    ]
    assert task.score([sentence], [prediction]).scores["f1"] == 1.0


def test_invalid_i_tags_are_repaired(tokenizer):
    task = make_task()
    sentence = example("john smith in paris london", None)
    features = task.featurize([sentence], tokenizer, training=False)
    assert features[0].target is None
    logits = predicted_logits(task, features, ["I-PER", "I-PER", "O", "B-PER", "I-LOC"])
    (prediction,) = task.decode([sentence], features, logits)
    assert prediction["tags"] == ["B-PER", "I-PER", "O", "B-PER", "B-LOC"]
    assert prediction["entities"] == [
        {"type": "PER", "start": 0, "end": 2, "text": "john smith", "score": ONE_HOT},
        {"type": "PER", "start": 3, "end": 4, "text": "paris", "score": ONE_HOT},
        {"type": "LOC", "start": 4, "end": 5, "text": "london", "score": ONE_HOT},
    ]
    assert task.prediction_record(sentence, prediction)["tokens"] == sentence.tokens


def test_collate_pads_with_ignore_and_loss_skips_it(tokenizer):
    task = make_task()
    examples = [example("unbelievable paris", "O B-LOC"), example("john", "B-PER")]
    batch = task.collate(task.featurize(examples, tokenizer, training=True), tokenizer.pad_token_id)
    assert batch.targets.tolist()[1] == [IGNORE_INDEX, LABELS.index("B-PER"), IGNORE_INDEX] + [IGNORE_INDEX] * 3
    logits = torch.randn(2, 6, len(LABELS))
    labelled = batch.targets != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[labelled], batch.targets[labelled])
    torch.testing.assert_close(task.loss(logits, batch.targets), expected)
    logits[~labelled] = 100.0  # ignored positions must not move the loss
    torch.testing.assert_close(task.loss(logits, batch.targets), expected)
    assert task.loss(logits, torch.full((2, 6), IGNORE_INDEX)).item() == 0.0


def test_records_raw_inputs_and_labels():
    task = make_task(labels=None)
    record = Record({"tokens": ["john", "smith"], "tags": ["B-PER", "I-PER"]}, "train.conll:1")
    parsed = task.example_from_record(record, 3)
    assert (parsed.guid, parsed.tokens, parsed.tags) == ("3", ["john", "smith"], ["B-PER", "I-PER"])
    task.fit_labels([parsed])
    assert task.labels == ["B-PER", "I-PER", "O"]
    with pytest.raises(DataError, match=r"train.conll:1: 2 tokens but 1 tags"):
        task.example_from_record(Record({"tokens": ["a", "b"], "tags": ["O"]}, "train.conll:1"), 0)
    assert task.example_from_raw({"tokens": ["a", "b"], "id": "x"}, 0) == TaggingExample("x", ["a", "b"])
    assert task.example_from_raw({"text": " the  film "}, 0).tokens == ["the", "film"]
    with pytest.raises(DataError, match="'tokens'"):
        task.example_from_raw({"words": []}, 0)
    with pytest.raises(ConfigError, match="must include 'O'"):
        make_task(labels=["B-PER"]).fit_labels([])
    with pytest.raises(ConfigError, match="not an IOB2 tag"):
        make_task(labels=["O", "S-PER"]).fit_labels([])


def test_training_reduces_the_loss(tokenizer):
    task = make_task()
    examples = [
        example("john smith was born in paris", "B-PER I-PER O O O B-LOC"),
        example("london is a city", "B-LOC O O O"),
        example("the capital of france is paris", "O O O B-LOC O B-LOC"),
        example("john did love the movie", "B-PER O O O O"),
    ]
    batch = task.collate(task.featurize(examples, tokenizer, training=True), tokenizer.pad_token_id)
    torch.manual_seed(0)
    head = HEADS.get("token")(HeadConfig(dropout=0.0), 32, task.num_outputs)
    model = MultiTaskModel(tiny_encoder(), {"ner": head}, layout=None)
    inputs = ModelInputs(batch.input_ids, batch.attention_mask, torch.zeros(4, dtype=torch.long), batch.token_type_ids)
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = task.loss(model(inputs)["ner"][0], batch.targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
