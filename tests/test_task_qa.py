"""Extractive QA: windows and targets, span decoding back to exact context text, scoring, and a training smoke test."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import ByteLevelBPETokenizer, processors
from transformers import PreTrainedTokenizerFast

from multitask.data.records import Record
from multitask.errors import ConfigError, DataError
from multitask.heads import HEADS, HeadConfig
from multitask.model import ModelInputs, MultiTaskModel
from multitask.prefix.bank import TaskPrefixRequest, plan_layout
from multitask.prefix.config import PrefixBankConfig, PrefixConfig
from multitask.tasks.base import TASK_TYPES
from multitask.tasks.config import TaskConfig, TaskData
from multitask.tasks.qa import NO_ANSWER, QAExample, QAOptions, QATask
from tests.tiny import tiny_encoder, tiny_tokenizer

CONTEXT = "john smith was born in london . paris is the capital of france ."
ANSWER = "capital of france"


def make_task(max_length: int = 16, **options) -> QATask:
    config = TaskConfig(name="squad", type="qa", data=TaskData(), max_length=max_length)
    settings = {"doc_stride": 2, "max_question_length": 4, **options}
    return QATask(config, QAOptions(**settings))


def example(context: str = CONTEXT, answer: str | None = ANSWER, question: str = "where is paris", guid: str = "q1"):
    answers = None if answer is None else [(answer, context.index(answer))]
    return QAExample(guid, question, context, answers)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """RoBERTa-style byte-level BPE whose offsets keep the leading space (trim_offsets off)."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([CONTEXT, "who is john smith", "where is paris"], vocab_size=300, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>"], show_progress=False)
    bpe.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", cls_token="<s>",
                                   sep_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                   model_input_names=["input_ids", "attention_mask"])


def logits_for(features, peaks: dict[int, tuple[int, int]], value: float = 5.0) -> list[np.ndarray]:
    """Zero logits except start/end peaks at the given token positions of the given features."""
    rows = [np.zeros((len(f), 2), dtype=np.float32) for f in features]
    for index, (start, end) in peaks.items():
        rows[index][start, 0] = value
        rows[index][end, 1] = value
    return rows


def tokens(tokenizer, feature, start: int, end: int) -> list[str]:
    return tokenizer.convert_ids_to_tokens(feature.input_ids[start : end + 1])


def test_registered_with_two_outputs_and_no_labels():
    task = make_task()
    assert TASK_TYPES.get("qa") is QATask and task.head_kind == "span"
    assert task.num_outputs == 2
    task.fit_labels([example()])
    assert task.labels == []


def test_answer_in_second_window_only(tokenizer):
    features = make_task().featurize([example()], tokenizer, training=True)
    assert len(features) == 2 and all(f.example_index == 0 for f in features)
    assert features[0].target == NO_ANSWER
    start, end = features[1].target
    assert tokens(tokenizer, features[1], start, end) == ["capital", "of", "france"]
    assert features[1].token_type_ids is not None


def test_windows_overlap_by_the_stride(tokenizer):
    first, second = make_task(doc_stride=3).featurize([example()], tokenizer, training=False)
    first_context = [span for span in first.offsets if span is not None]
    second_context = [span for span in second.offsets if span is not None]
    assert first_context[-3:] == second_context[:3]


def test_decode_english_answer_from_second_window(tokenizer):
    task = make_task()
    features = task.featurize([example()], tokenizer, training=False)
    prediction = task.decode([example()], features, logits_for(features, {1: features[1].target}))[0]
    assert prediction["answer"] == ANSWER
    assert prediction["start"] == CONTEXT.index(ANSWER) and prediction["end"] == prediction["start"] + len(ANSWER)
    assert prediction["logit"] == pytest.approx(10.0) and 0.0 < prediction["score"] <= 1.0


def test_chinese_context_without_spaces(tokenizer):
    task = make_task(max_length=32, language="zh")
    zh = example("北京是中国的首都", "北京", "中国的首都在哪里?")
    (feature,) = task.featurize([zh], tokenizer, training=True)
    assert tokens(tokenizer, feature, *feature.target) == ["北", "京"]
    prediction = task.decode([zh], [feature], logits_for([feature], {0: feature.target}))[0]
    # 36 candidate spans over 8 characters: (0, 1) scores 10, 8 spans share one peak (5), the other 27 score 0.
    probability = np.exp(10) / (np.exp(10) + 8 * np.exp(5) + 27)
    assert prediction == {"answer": "北京", "start": 0, "end": 2, "score": pytest.approx(probability),
                          "logit": pytest.approx(10.0)}


def test_byte_level_offsets_are_trimmed(bpe_tokenizer):
    task = make_task(max_length=40, doc_stride=4)
    smith = example(answer="smith")
    (feature,) = task.featurize([smith], bpe_tokenizer, training=True)
    assert feature.token_type_ids is None
    start, end = feature.target
    assert "".join(tokens(bpe_tokenizer, feature, start, end)) == "Ġsmith"
    prediction = task.decode([smith], [feature], logits_for([feature], {0: feature.target}))[0]
    assert prediction["answer"] == "smith" and prediction["start"] == CONTEXT.index("smith")


@pytest.mark.parametrize("max_answer_length, expected", [(3, (6, 8)), (5, (0, 3))])
def test_n_best_respects_length_and_order(tokenizer, max_answer_length, expected):
    task = make_task(max_length=32, max_answer_length=max_answer_length)
    (feature,) = task.featurize([example()], tokenizer, training=False)
    first = feature.offsets.index(next(span for span in feature.offsets if span is not None))
    row = np.zeros((len(feature), 2), dtype=np.float32)
    # The top start (6) lies after the top end (3); the pair (0, 3) is four tokens long.
    row[first + np.array([6, 0]), 0] = [10.0, 6.0]
    row[first + np.array([3, 8, 1]), 1] = [10.0, 4.0, 3.0]
    prediction = task.decode([example()], [feature], [row])[0]
    start, end = (first + i for i in expected)
    assert prediction["answer"] == CONTEXT[feature.offsets[start][0] : feature.offsets[end][1]]
    assert prediction["logit"] == pytest.approx(row[start, 0] + row[end, 1])


def test_score_matches_hand_computed_values():
    task = make_task()
    examples = [
        QAExample("a", "q", "Paris", [("Paris", 0)]),
        QAExample("b", "q", "capital of france", [("capital of france", 0)]),
        QAExample("c", "q", "london", [("london", 0)]),
        QAExample("d", "q", "unlabelled"),  # prediction input: not scored
    ]
    predictions = [{"answer": a} for a in ("paris", "france", "paris", "x")]
    assert not task.is_labelled(examples) and task.is_labelled(examples[:3] + [QAExample("e", "q", "c", [])])
    result = task.score(examples, predictions)
    assert result.scores["exact_match"] == pytest.approx(1 / 3)
    assert result.scores["f1"] == pytest.approx((1 + 0.5 + 0) / 3)  # "france" vs 3 gold tokens: P 1, R 1/3
    assert task.main_metric() == "f1"


def test_score_chinese_uses_character_tokens():
    task = make_task(language="zh")
    result = task.score([QAExample("a", "q", "北京市", [("北京", 0)])], [{"answer": "北京市"}])
    assert result.scores["exact_match"] == 0.0
    assert result.scores["f1"] == pytest.approx(0.8)  # common run 2: P 2/3, R 1


def test_unlocated_answers_are_ignored_for_targets(tokenizer):
    task = make_task(max_length=32)
    context = "北京是中国的首都"
    located = QAExample("a", "q", context, [("首都", -1), ("中国", 0), ("北京", 0)])
    unlocated = QAExample("b", "q", context, [("首都", -1)])
    features = task.featurize([located, unlocated], tokenizer, training=True)
    assert [f.example_index for f in features] == [0]
    assert tokens(tokenizer, features[0], *features[0].target) == ["北", "京"]
    evaluation = task.featurize([located, unlocated], tokenizer, training=False)
    assert [f.target is None for f in evaluation] == [False, True]


def test_unanswerable_questions(tokenizer):
    unanswerable = QAExample("a", "who is john smith", CONTEXT, [])
    assert make_task().featurize([unanswerable], tokenizer, training=True) == []
    task = make_task(allow_no_answer=True)
    features = task.featurize([unanswerable], tokenizer, training=True)
    assert features and all(f.target == NO_ANSWER for f in features)
    logits = logits_for(features, {0: (3, 3)})  # a question token: never a candidate
    for row in logits:
        row[0] = 6.0  # [CLS]: null score 12 in every window
    context_start = features[1].offsets.index(next(s for s in features[1].offsets if s is not None))
    logits[1][context_start, :] = 5.0  # best span scores 10
    null = task.decode([unanswerable], features, logits)[0]
    assert {k: null[k] for k in ("answer", "start", "end", "logit")} == {"answer": "", "start": -1, "end": -1,
                                                                          "logit": 12.0}
    assert 0.5 < null["score"] < 1.0  # no answer is a candidate of the softmax, and the likeliest
    lenient = make_task(allow_no_answer=True, no_answer_threshold=3.0)
    assert lenient.decode([unanswerable], features, logits)[0]["answer"] != ""
    assert make_task().decode([unanswerable], features, logits)[0]["answer"] != ""


def test_loss_ignores_padding(tokenizer):
    task = make_task(max_length=40)
    short, long = task.featurize([example(), example(context=CONTEXT + " " + CONTEXT)], tokenizer, training=True)
    batch = task.collate([short, long], tokenizer.pad_token_id)
    logits = torch.randn(2, batch.input_ids.shape[1], 2)
    padded = logits.clone()
    padded[0, len(short):] = 100.0
    alone = (task.loss(logits[:1, : len(short)], batch.targets[:1]) + task.loss(logits[1:], batch.targets[1:])) / 2
    torch.testing.assert_close(task.loss(padded, batch.targets), alone)


def test_records_raw_inputs_and_prediction_rows():
    task = make_task()
    record = Record({"id": 7, "question": "q", "context": "c d", "title": "t",
                     "answers": {"text": ["d"], "answer_start": [2]}}, "train.json:data[0]")
    parsed = task.example_from_record(record, 0)
    assert parsed == QAExample("7", "q", "c d", [("d", 2)], "t")
    with pytest.raises(DataError, match="train.json"):
        task.example_from_record(Record({"question": "q", "context": "c", "answers": [{"text": "c"}]}, "train.json"), 0)
    raw = task.example_from_raw({"question": "q", "context": "c"}, 3)
    assert raw.guid == "3" and raw.answers is None
    with pytest.raises(DataError):
        task.example_from_raw({"question": "q"}, 0)
    row = task.prediction_record(parsed, {"answer": "d", "start": 2, "score": 1.0})
    assert row == {"id": "7", "question": "q", "gold": ["d"], "answer": "d", "start": 2, "score": 1.0}


def test_stride_must_fit_the_window(tokenizer):
    with pytest.raises(ConfigError, match="doc_stride"):
        make_task(max_length=16, doc_stride=9).featurize([example()], tokenizer, training=True)


def test_no_examples_no_features(tokenizer):
    assert make_task().featurize([], tokenizer, training=True) == []


def test_long_questions_are_cut(tokenizer):
    long_question = "who is john smith and where was john smith born"
    (feature,) = make_task(max_length=40).featurize([example(question=long_question)], tokenizer, training=False)
    assert feature.input_ids.index(tokenizer.sep_token_id) == 1 + 4


def test_training_reduces_the_loss(tokenizer):
    task = make_task(max_length=24, doc_stride=4)
    examples = [example(), example(answer="john smith", guid="q2"), example("北京是中国的首都", "北京", "谁", guid="q3")]
    batch = task.collate(task.featurize(examples, tokenizer, training=True), tokenizer.pad_token_id)
    layout = plan_layout(PrefixBankConfig(prefix=PrefixConfig(length=4, mlp_hidden_size=16, dropout=0.0)),
                         [TaskPrefixRequest("squad")])
    torch.manual_seed(0)
    model = MultiTaskModel(tiny_encoder(), {"squad": HEADS.get("span")(HeadConfig(dropout=0.0), 32)}, layout)
    inputs = ModelInputs(batch.input_ids, batch.attention_mask, torch.zeros(len(batch.input_ids), dtype=torch.long),
                         batch.token_type_ids)
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = task.loss(model(inputs)["squad"][0], batch.targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
