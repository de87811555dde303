"""Predictions a program can use: raw text split into words as the training data is, entities with character
offsets into the input, scores that are probabilities (QA over every candidate span, NER per entity, every label on
request), the same from predict, analyze, evaluate's prediction files and the server; metrics as before (they are
scored on gold tokens)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multitask.cli import main
from multitask.config import load_config
from multitask.data.features import TaggingFeature
from multitask.data.root import data_root
from multitask.data.tag_schemes import to_iob2
from multitask.errors import ConfigError
from multitask.experiment import ExperimentConfig
from multitask.run import evaluate_run, load_run
from multitask.serve import create_app, load_catalog
from multitask.tasks.classification import ClassificationTask, TextExample
from multitask.tasks.config import TaskConfig, TaskData
from multitask.tasks.loading import load_task, load_task_data
from multitask.tasks.multilabel import MultiLabelTask
from multitask.tasks.ner import NerOptions, NerTask, split_words
from multitask.tasks.qa import QAExample, QAOptions, QATask
from multitask.training.trainer import Trainer
from tests.fixtures import write_project
from tests.tiny import tiny_tokenizer

PROPERTY = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
NER_LABELS = ["B-LOC", "B-PER", "I-LOC", "I-PER", "O"]
SENTENCE = "Angela Merkel met Emmanuel Macron in Berlin on Tuesday."


def words(text: str, how: str = "auto") -> list[str]:
    return [word.text for word in split_words(text, how)]


def ner_task(word_split: str = "auto") -> NerTask:
    config = TaskConfig(name="ner", type="ner", data=TaskData(), labels=NER_LABELS)
    return NerTask(config, NerOptions(word_split=word_split))


# ---------------------------------------------------------------------------------------------- splitting
@pytest.mark.parametrize("text, expected", [
    (SENTENCE, ["Angela", "Merkel", "met", "Emmanuel", "Macron", "in", "Berlin", "on", "Tuesday", "."]),
    ("It was dull, said Lee's friend.", ["It", "was", "dull", ",", "said", "Lee", "'s", "friend", "."]),
    ("They don't like the U.S. or a.m. shows", ["They", "do", "n't", "like", "the", "U.S.", "or", "a.m.", "shows"]),
    ("Shares rose 3.5% to 1,000 at 10:30 on 1996-08-22.",
     ["Shares", "rose", "3.5", "%", "to", "1,000", "at", "10:30", "on", "1996-08-22", "."]),
    ("Mr. Smith of Acme Inc. paid US$ 12.50 (well-known S&P)...",
     ["Mr.", "Smith", "of", "Acme", "Inc.", "paid", "US$", "12.50", "(", "well-known", "S&P", ")", "..."]),
    ("O'Brien's players' \"win\" -- J. Smith!", ["O'Brien", "'s", "players", "'", '"', "win", '"', "--", "J.", "Smith",
                                                  "!"]),
])
def test_english_text_splits_as_conll_does(text, expected):
    assert words(text) == words(text, "punctuation") == expected


def test_chinese_text_splits_per_character_and_the_task_file_can_choose():
    assert words("北京 是中国的首都。") == list("北京是中国的首都。")
    assert words("我在Berlin工作", "characters") == list("我在Berlin工作")
    assert words("Berlin on Tuesday.", "characters") == list("BerlinonTuesday.")
    assert words("Berlin on Tuesday.", "whitespace") == ["Berlin", "on", "Tuesday."]
    assert words("北京 是中国", "punctuation") == ["北京", "是中国"]
    assert ner_task("whitespace").example_from_raw(SENTENCE, 0).tokens[-1] == "Tuesday."


def test_token_lists_are_kept_as_given():
    task = ner_task()
    example = task.example_from_raw({"tokens": ["Berlin.", "U.S", "北京"], "id": "t"}, 0)
    assert (example.guid, example.tokens, example.text, example.spans) == ("t", ["Berlin.", "U.S", "北京"], None, None)
    feature = TaggingFeature(input_ids=[0] * 5, example_index=0, word_positions=[(0, 1), (1, 2), (2, 3)])
    logits = np.zeros((5, len(NER_LABELS)), dtype=np.float32)
    logits[[1, 2, 3], NER_LABELS.index("B-LOC")] = 4.0
    (prediction,) = task.decode([example], [feature], [logits])
    assert [e["text"] for e in prediction["entities"]] == ["Berlin.", "U.S", "北京"]
    assert all("char_start" not in e and 0.0 < e["score"] <= 1.0 for e in prediction["entities"])


def test_word_split_is_checked_with_the_file_and_key(tmp_path):
    task_file = tmp_path / "ner.yaml"
    task_file.write_text("name: ner\ntype: ner\ndata: {}\noptions: {word_split: spaces}\n")
    with pytest.raises(ConfigError) as error:
        load_task(task_file)
    message = str(error.value)
    assert "\n" not in message and str(task_file) in message and "options.word_split" in message
    assert "'punctuation'" in message and "'spaces'" in message
    task_file.write_text("name: ner\ntype: ner\ndata: {}\noptions: {word_split: characters}\n")
    assert load_task(task_file).options.word_split == "characters"


# ---------------------------------------------------------------------------------------------- offsets
ENGLISH = ["Angela", "Merkel", "U.S.", "Lee's", "don't", "3.5", "1,000", "well-known", "O'Brien", "Mr.", "Inc.",
           "US$", "S&P", "a.m.", "Berlin", "players'", "I"]
CHINESE = list("北京是中国的首都上海人民天安门") + ["Berlin", "iPhone", "3.5"]
MARKS = list(".,!?;:'\"()-$%&’") + ["--", "...", "，", "。", "《", "》", "、"]
SPACES = [" ", " ", "  ", "\t", "\n", "\u3000", "\xa0"]


def sentences(vocabulary: list[str]):
    """Words, marks and spaces in any order, punctuation often touching words (as people type)."""
    pieces = st.lists(st.sampled_from(vocabulary + MARKS + SPACES), max_size=30)
    return pieces.map("".join)


TEXTS = st.one_of(sentences(ENGLISH), sentences(CHINESE), st.text(max_size=40))


@PROPERTY
@given(TEXTS, st.sampled_from(["auto", "punctuation", "characters", "whitespace"]))
def test_words_keep_their_character_spans(text, how):
    split = split_words(text, how)
    assert all(word.text and word.text == text[word.start : word.end] for word in split)
    assert all(before.end <= after.start for before, after in zip(split, split[1:]))
    assert "".join(word.text for word in split) == "".join(char for char in text if not char.isspace())


@PROPERTY
@given(TEXTS, st.data())
def test_entities_slice_the_input_text(text, data):
    task = ner_task()
    example = task.example_from_raw({"text": text}, 0)
    count = len(example.tokens)
    tags = data.draw(st.lists(st.sampled_from(NER_LABELS), min_size=count, max_size=count))
    feature = TaggingFeature(input_ids=[0] * (count + 2), example_index=0,
                             word_positions=[(word, word + 1) for word in range(count)])
    logits = np.random.default_rng(count).normal(size=(count + 2, len(NER_LABELS))).astype(np.float32)
    for word, tag in enumerate(tags):
        logits[word + 1, NER_LABELS.index(tag)] += 6.0
    (prediction,) = task.decode([example], [feature], [logits])
    assert prediction["tags"] == to_iob2(tags, "iob2")
    for entity in prediction["entities"]:
        assert text[entity["char_start"] : entity["char_end"]] == entity["text"]
        assert entity["text"].startswith(example.tokens[entity["start"]])
        assert entity["text"].endswith(example.tokens[entity["end"] - 1])
        assert 0.0 < entity["score"] <= 1.0


# ---------------------------------------------------------------------------------------------- QA scores
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


QA_CONTEXT = "john smith was born in london . paris is the capital of france . 北京是中国的首都"


def brute_force_candidates(task: QATask, features, logits) -> list[float]:
    """Every (start, end) pair of context tokens of every window that a span may be, by enumeration."""
    found = []
    for feature, rows in zip(features, logits):
        context = [i for i, span in enumerate(feature.offsets) if span is not None]
        found += [float(rows[s, 0] + rows[e, 1]) for s in context for e in context
                  if 1 <= e - s + 1 <= task.options.max_answer_length]
    return found


@PROPERTY
@given(st.integers(0, 2**32 - 1), st.booleans(), st.integers(1, 8), st.floats(0.1, 8.0))
def test_qa_scores_are_probabilities_over_every_candidate_span(tokenizer, seed, allow_no_answer, longest, spread):
    task = QATask(TaskConfig(name="qa", type="qa", data=TaskData(), max_length=24),
                  QAOptions(doc_stride=4, max_question_length=4, max_answer_length=longest, n_best=64,
                            allow_no_answer=allow_no_answer))
    example = QAExample("q", "where was john born ?", QA_CONTEXT)
    features = task.featurize([example], tokenizer, training=False)
    assert len(features) > 1
    rng = np.random.default_rng(seed)
    logits = [(rng.normal(size=(len(f), 2)) * spread).astype(np.float32) for f in features]
    (prediction,) = task.decode([example], features, logits)
    candidates = brute_force_candidates(task, features, logits)
    null = min(float(rows[0, 0] + rows[0, 1]) for rows in logits)
    everything = np.array(candidates + ([null] if allow_no_answer else []), dtype=np.float64)
    probabilities = np.exp(everything - everything.max()) / np.exp(everything - everything.max()).sum()
    assert ((probabilities >= 0) & (probabilities <= 1)).all()
    assert probabilities[: len(candidates)].sum() <= 1 + 1e-9
    assert 0.0 <= prediction["score"] <= 1.0
    assert prediction["score"] == pytest.approx(float(np.exp(prediction["logit"] - everything.max())
                                                      / np.exp(everything - everything.max()).sum()), rel=1e-6)
    if prediction["answer"]:
        assert QA_CONTEXT[prediction["start"] : prediction["end"]] == prediction["answer"]
        assert prediction["score"] == pytest.approx(probabilities[: len(candidates)].max(), rel=1e-6)
    else:
        assert (prediction["start"], prediction["end"], prediction["logit"]) == (-1, -1, pytest.approx(null))


# ---------------------------------------------------------------------------------------------- label scores
def test_classification_scores_every_label_on_request():
    config = TaskConfig(name="cls", type="classification", data=TaskData(), labels=["0", "1", "2"],
                        label_names={"0": "negative", "1": "positive", "2": "mixed"})
    task = ClassificationTask(config)
    plain, asked = TextExample("a", "fine"), TextExample("b", "fine")
    task.request_all_scores(asked)
    rows = [np.array([0.5, 2.0, -1.0], dtype=np.float32)] * 2
    first, second = (task.prediction_record(e, p) for e, p in zip([plain, asked], task.decode([plain, asked], [], rows)))
    assert "scores" not in first and first["label"] == "positive" and first["label_id"] == "1"
    assert set(second["scores"]) == {"negative", "positive", "mixed"}
    assert sum(second["scores"].values()) == pytest.approx(1.0)
    assert second["score"] == first["score"] == max(second["scores"].values()) == second["scores"]["positive"]


def test_multilabel_probabilities_are_each_labels_own():
    task = MultiLabelTask(TaskConfig(name="ml", type="multilabel", data=TaskData(), labels=["a", "b", "c"]))
    example = TextExample("x", "text")
    task.request_all_scores(example)  # nothing to add: every label's probability is always there
    (prediction,) = task.decode([example], [], [np.array([3.0, -3.0, 0.2], dtype=np.float32)])
    assert prediction["labels"] == ["a", "c"]
    assert all(0.0 < p < 1.0 for p in prediction["probabilities"].values())


# ---------------------------------------------------------------------------------------------- a trained run
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prediction_fields")
    config = write_project(root, max_steps=6)
    experiment = load_config(ExperimentConfig, config, [])
    Trainer(experiment, root / "run", config_path=config, progress=False).train()
    return root / "run"


def tag_everything(run, tag: str = "B-PER") -> None:
    """Push the NER head towards one tag, so that every word is an entity: a tiny run predicts few otherwise."""
    last = [m for m in run.model.heads["ner"].modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.bias[run.tasks["ner"].labels.index(tag)] += 100.0


@pytest.fixture(scope="module")
def tagging_run(run_dir):
    run = load_run(run_dir, device="cpu", precision="fp32")
    tag_everything(run)
    return run


def check_ner(prediction: dict, text: str | None) -> None:
    assert prediction["entities"]
    for entity in prediction["entities"]:
        assert 0.0 < entity["score"] <= 1.0
        if text is None:
            assert "char_start" not in entity
        else:
            assert text[entity["char_start"] : entity["char_end"]] == entity["text"]


def check_qa(prediction: dict, context: str) -> None:
    assert 0.0 <= prediction["score"] <= 1.0 and isinstance(prediction["logit"], float)
    assert context[prediction["start"] : prediction["end"]] == prediction["answer"]


def test_predict_and_analyze_carry_offsets_and_probabilities(tagging_run):
    run = tagging_run
    ner = run.predict("ner", [SENTENCE, {"tokens": ["london", "is", "a", "city"]}, "北京 是中国的首都"])
    assert ner[0]["tokens"][-2:] == ["Tuesday", "."]
    check_ner(ner[0], SENTENCE)
    check_ner(ner[1], None)
    check_ner(ner[2], "北京 是中国的首都")
    qa_input = {"question": "where was john born ?", "context": "john smith was born in london ."}
    check_qa(run.predict("qa", [qa_input])[0], qa_input["context"])
    plain, asked = run.predict("cls", ["good movie"])[0], run.predict("cls", ["good movie"], all_scores=True)[0]
    assert "scores" not in plain and sum(asked["scores"].values()) == pytest.approx(1.0)
    assert asked["score"] == pytest.approx(asked["scores"][asked["label"]])
    (analyzed,) = run.analyze([SENTENCE], all_scores=True)
    assert set(analyzed) == {"cls", "ner"} and "scores" in analyzed["cls"]
    check_ner(analyzed["ner"], SENTENCE)


def test_cli_predict_all_scores_and_evaluate_prediction_files(run_dir, tmp_path):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('"good movie"\n{"text": "boring film", "id": "b"}\n', encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert main(["predict", str(run_dir), "--task", "cls", "--input", str(inputs), "--output", str(out),
                 "--all-scores", "--device", "cpu"]) in (0, None)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [sorted(row["scores"]) for row in rows] == [["0", "1"]] * 2
    run = load_run(run_dir, device="cpu", precision="fp32")
    evaluate_run(run, tmp_path / "evaluation")
    qa_rows = [json.loads(line) for line in (tmp_path / "evaluation/predictions/qa.validation.jsonl").open()]
    assert qa_rows and all({"answer", "start", "end", "score", "logit"} <= set(row) for row in qa_rows)
    assert all(0.0 <= row["score"] <= 1.0 for row in qa_rows)
    ner_rows = [json.loads(line) for line in (tmp_path / "evaluation/predictions/ner.validation.jsonl").open()]
    assert all("score" in entity and "char_start" not in entity for row in ner_rows for entity in row["entities"])


def test_server_answers_carry_the_new_fields(run_dir):
    catalog = load_catalog([str(run_dir)], device="cpu", precision="fp32")
    tag_everything(catalog.runs["tiny"])
    qa_input = {"question": "where was john born ?", "context": "john smith was born in london ."}
    with TestClient(create_app(catalog)) as client:
        response = client.post("/v1/predict", json=[
            {"task": "cls", "inputs": ["good movie"], "all_scores": True},
            {"task": "cls", "inputs": ["good movie"]},
            {"task": "ner", "inputs": [SENTENCE]},
            {"task": "qa", "inputs": [qa_input]}])
        assert response.status_code == 200, response.text
        asked, plain, ner, qa = (r["predictions"][0] for r in response.json()["results"])
        assert sum(asked["scores"].values()) == pytest.approx(1.0) and "scores" not in plain
        check_ner(ner, SENTENCE)
        check_qa(qa, qa_input["context"])
        analyzed = client.post("/v1/analyze", json={"texts": [SENTENCE], "all_scores": True}).json()["results"][0]
        assert "scores" in analyzed["cls"] and analyzed["ner"]["entities"][0]["char_start"] == 0
        lax = client.post("/v1/predict", json={"task": "cls", "inputs": ["good"], "all_scores": "yes"})
        assert lax.status_code == 422 and "all_scores" in lax.json()["detail"]
        schema = client.get("/openapi.json").json()["components"]["schemas"]
        assert "char_start" in schema["TaskPredictions"]["properties"]["predictions"]["description"]


# ---------------------------------------------------------------------------------------------- metrics unchanged
def gold_token_predictions(task, examples, features, logits) -> list[dict]:
    """The decoding before scores and offsets existed: argmax tags, the best n-best span, the argmax label."""
    if task.config.type == "ner":
        tags = [["O"] * len(example.tokens) for example in examples]
        for feature, rows in zip(features, logits):
            for word, position in feature.word_positions:
                tags[feature.example_index][word] = task.labels[int(rows[position].argmax())]
        return [{"tags": to_iob2(sentence, "iob2")} for sentence in tags]
    if task.config.type == "qa":
        answers = []
        for index, example in enumerate(examples):
            spans = [task.best_span(f.offsets, rows) for f, rows in zip(features, logits) if f.example_index == index]
            best = max((s for s in spans if s is not None), key=lambda s: s.score, default=None)
            answers.append({"answer": "" if best is None else example.context[best.start : best.end]})
        return answers
    return [{"label": task.labels[int(rows.argmax())]} for rows in logits]


def test_metrics_are_unchanged_and_scored_on_gold_tokens(run_dir):
    run = load_run(run_dir, device="cpu", precision="fp32")
    root = data_root(run.experiment.data_root)
    for name, task in run.tasks.items():
        examples = load_task_data(task, root, name).examples["validation"]
        evaluation = run.evaluate_split(name, examples)
        features = run.engine.featurize(name, examples)
        logits = run.engine.logits({name: features})[name]
        expected = task.score(examples, gold_token_predictions(task, examples, features, logits)).scores
        assert evaluation.result.scores == {k: v for k, v in expected.items() if k in evaluation.result.scores}
        assert evaluation.result.scores[task.main_metric()] == expected[task.main_metric()]
        if name == "ner":  # the gold tokens were scored, not a re-split of their text
            assert [row["tokens"] for row in evaluation.predictions] == [e.tokens for e in examples]
