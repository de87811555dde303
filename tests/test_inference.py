"""The inference engine behind evaluation, `load_run`, predict/evaluate and the server: mixed-task batches give each
task's own outputs, sentence pairs are detected per example, label names reach predictions and reports, and the
CLI's --device/--precision/--batch-size reach the engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from multitask.cli import main
from multitask.config import load_config
from multitask.data.features import Feature
from multitask.errors import ConfigError, DataError
from multitask.experiment import ExperimentConfig
from multitask.inference.engine import pad_inputs
from multitask.run import load_run
from multitask.tasks.classification import text_features
from multitask.tasks.loading import load_task
from multitask.training.trainer import Trainer
from tests.fixtures import write_project
from tests.tiny import tiny_tokenizer

NER_INPUTS = [{"text": "john smith was born in paris"}, {"tokens": ["london", "is", "a", "city"]}, "the river"]
QA_INPUTS = [{"question": "where was john born ?", "context": "john smith was born in london ."},
             {"question": "what is the capital of france ?", "context": "paris is the capital of france ."}]
CLS_INPUTS = ["good movie", {"text": "boring film"}, {"text": "great fun film", "text_pair": "i love this plot"},
              "bad acting and a boring plot"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inference")
    config = write_project(root, max_steps=6)
    task_file = root / "tasks" / "cls.yaml"
    task_file.write_text(task_file.read_text() + 'label_names: {"0": negative, "1": positive}\n')
    experiment = load_config(ExperimentConfig, config, [])
    Trainer(experiment, root / "run", config_path=config, progress=False).train()
    return root / "run"


@pytest.fixture(scope="module")
def run(run_dir):
    return load_run(run_dir, precision="fp32")


def _same(mixed: list[dict], alone: list[dict], ignore: tuple[str, ...] = ()) -> None:
    assert len(mixed) == len(alone)
    for left, right in zip(mixed, alone):
        assert left.keys() == right.keys()
        for key in set(left) - set(ignore):
            _close(left[key], right[key])


def _close(left, right) -> None:
    """Equal, floats (also inside entities and score maps) to 1e-5: batches of other lengths move the last digits."""
    if isinstance(left, float):
        assert left == pytest.approx(right, abs=1e-5)
    elif isinstance(left, (list, dict)):
        assert type(left) is type(right) and len(left) == len(right)
        for a, b in zip(left, right) if isinstance(left, list) else ((left[k], right[k]) for k in left):
            _close(a, b)
    else:
        assert left == right


def test_mixed_task_pass_gives_each_tasks_own_predictions(run):
    mixed = run.predict_many({"cls": CLS_INPUTS, "ner": NER_INPUTS, "qa": QA_INPUTS})
    for name, inputs in (("cls", CLS_INPUTS), ("ner", NER_INPUTS), ("qa", QA_INPUTS)):
        _same(mixed[name], run.predict(name, inputs))
        # Batch composition does not matter (an input's id defaults to its position, so it differs here).
        _same(mixed[name], [run.predict(name, [one])[0] for one in inputs], ignore=("id",))


def test_small_batches_and_batching_across_tasks_agree(run_dir, run):
    tiny_batches = load_run(run_dir, precision="fp32", batch_size=1)
    inputs = {"cls": CLS_INPUTS, "ner": NER_INPUTS, "qa": QA_INPUTS}
    expected = run.predict_many(inputs)
    got = tiny_batches.predict_many(inputs)
    for name in inputs:
        _same(got[name], expected[name])


def test_mixed_batch_pads_token_types_of_tasks_without_them():
    with_types = Feature([2, 5, 6, 3], 0, token_type_ids=[0, 0, 1, 1])
    without = Feature([2, 7, 3], 0)
    inputs = pad_inputs([with_types, without], [0, 1], pad_id=0)
    assert inputs.input_ids.tolist() == [[2, 5, 6, 3], [2, 7, 3, 0]]
    assert inputs.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert inputs.token_type_ids.tolist() == [[0, 0, 1, 1], [0, 0, 0, 0]]
    assert inputs.task_ids.tolist() == [0, 1]
    assert pad_inputs([without], [1], 0).token_type_ids is None


def test_sentence_pairs_are_detected_per_example(tmp_path):
    tokenizer = tiny_tokenizer(tmp_path / "tok")
    from multitask.tasks.classification import TextExample

    examples = [TextExample("a", "good movie", None), TextExample("b", "good movie", "bad plot"),
                TextExample("c", "fun", None)]
    features = text_features(examples, tokenizer, 16, lambda e: 0)
    alone = [text_features([e], tokenizer, 16, lambda e: 0)[0] for e in examples]
    assert [f.input_ids for f in features] == [f.input_ids for f in alone]
    assert [f.token_type_ids for f in features] == [f.token_type_ids for f in alone]
    assert [f.example_index for f in features] == [0, 1, 2]
    assert 1 in features[1].token_type_ids and 1 not in features[0].token_type_ids


def test_analyze_runs_every_text_task_on_each_text(run):
    texts = ["john smith loved paris", "boring film"]
    results = run.analyze(texts)
    assert [sorted(r) for r in results] == [["cls", "ner"], ["cls", "ner"]]
    assert results[0]["ner"]["tokens"] == ["john", "smith", "loved", "paris"]
    assert results[1]["cls"] == run.predict("cls", texts)[1]
    assert [sorted(r) for r in run.analyze(texts, tasks=["cls"])] == [["cls"], ["cls"]]
    with pytest.raises(ConfigError, match="task 'nope' is not in run"):
        run.analyze(texts, tasks=["nope"])
    with pytest.raises(DataError, match="expected an object with string 'question' and 'context'"):
        run.analyze(texts, tasks=["qa"])


def test_label_names_show_in_predictions_and_reports(run_dir, run):
    rows = [json.loads(line) for line in (run_dir / "predictions" / "cls.validation.jsonl").read_text().splitlines()]
    assert {row["label"] for row in rows} <= {"negative", "positive"}
    assert {row["gold"] for row in rows} <= {"negative", "positive"}
    assert all(row["label_id"] == {"negative": "0", "positive": "1"}[row["label"]] for row in rows)
    report = json.loads((run_dir / "report.json").read_text())
    details = report["tasks"]["cls"]["details"]["validation"]
    assert details["confusion_matrix"]["labels"] == ["negative", "positive"]
    assert run.tasks["cls"].labels == ["0", "1"]  # the model keeps the data's labels
    assert run.predict("cls", ["good movie"])[0]["label"] in ("negative", "positive")


def test_label_names_must_name_known_labels(tmp_path):
    write_project(tmp_path)
    task_file = tmp_path / "tasks" / "cls.yaml"
    task_file.write_text(task_file.read_text() + 'label_names: {"0": negative, "2": positive}\n')
    from multitask.data.root import data_root
    from multitask.tasks.loading import load_task_data

    task = load_task(task_file)
    with pytest.raises(ConfigError, match=r"label_names names label '2', which is not in the label set \['0', '1'\]"):
        load_task_data(task, data_root(str(tmp_path / "data")), str(task_file))


def test_cli_predict_takes_device_precision_and_batch_size(run_dir, tmp_path, capsys):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("\n".join(json.dumps(x) for x in CLS_INPUTS) + "\n")
    out = tmp_path / "out.jsonl"
    main(["predict", str(run_dir), "--task", "cls", "--input", str(inputs), "--output", str(out),
          "--device", "cpu", "--precision", "fp32", "--batch-size", "2"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["label"] for r in rows] == [p["label"] for p in load_run(run_dir, precision="fp32").predict("cls", CLS_INPUTS)]
    with pytest.raises(SystemExit):
        main(["predict", str(run_dir), "--task", "cls", "--input", str(inputs), "--output", str(out),
              "--batch-size", "0"])
    assert "expected a positive integer, got 0" in capsys.readouterr().err


def test_cli_refuses_a_device_torch_does_not_have(run_dir, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["evaluate", str(run_dir), "--device", "cuda", "--output-dir", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("device 'cuda' was asked for, but torch sees no CUDA device here")


@pytest.mark.parametrize("training", [True, False])
def test_featurizing_in_chunks_under_a_progress_bar_gives_the_same_features(run_dir, run, monkeypatch, training):
    from multitask.data.root import data_root
    from multitask.tasks import base
    from multitask.tasks.loading import load_task_data

    monkeypatch.setattr(base, "FEATURIZE_CHUNK", 3)
    for name, task in run.tasks.items():
        task_file = run_dir.parent / "tasks" / f"{name}.yaml"
        examples = load_task_data(load_task(task_file), data_root(str(run_dir.parent / "data")),
                                  str(task_file)).examples["train"]
        whole = base.featurize_examples(task, examples, run.tokenizer, training, progress=False)
        chunked = base.featurize_examples(task, examples, run.tokenizer, training, progress=True)
        assert len(examples) > 3 and chunked == whole


def test_analyze_runs_the_shared_lower_layers_once_per_text(tmp_path):
    """A frozen shared prefix in every layer and task prefixes in the top layer: below it every task sees the same
    prefix, so analyze runs those layers once per text; its answers equal each task's own predictions."""
    config = write_project(tmp_path, max_steps=4)
    overrides = ["prefix.mode=hybrid", "prefix.shared_layers=all", "prefix.prefix.layers={top: 1}",
                 "prefix.shared_length=4"]
    Trainer(load_config(ExperimentConfig, config, overrides), tmp_path / "run", config_path=config,
            progress=False).train()
    run = load_run(tmp_path / "run", precision="fp32")
    lower_passes = []
    original = run.model.encode_lower
    run.model.encode_lower = lambda inputs, boundary: lower_passes.append((inputs.input_ids.shape[0], boundary)) \
        or original(inputs, boundary)
    texts = ["john smith loved paris", "boring film", "great fun film"]
    results = run.analyze(texts, tasks=["cls", "ner"])
    assert lower_passes and all(boundary == 1 for _, boundary in lower_passes)
    # cls and ner tokenise these texts alike, so each text's lower layers ran once (not once per task).
    assert sum(rows for rows, _ in lower_passes) == len(texts)
    run.model.encode_lower = original
    for name in ("cls", "ner"):
        _same([r[name] for r in results], run.predict(name, texts))
