"""End to end: a tiny joint run over fixture data of all three types, checkpoints, resume, CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from multitask.cli import main
from multitask.config import load_config
from multitask.errors import CheckpointError
from multitask.experiment import ExperimentConfig
from multitask.run import load_run
from multitask.training.state import trainable_state
from multitask.training.trainer import Trainer
from tests.fixtures import write_project
from tests.tiny import tiny_encoder


def make_trainer(config_path: Path, run_dir: Path, overrides=(), **kwargs) -> Trainer:
    experiment = load_config(ExperimentConfig, config_path, list(overrides))
    return Trainer(experiment, run_dir, config_path=config_path, progress=False, **kwargs)


# Attention per prefix: per_task and hybrid mix joint (cls) and separate (ner, qa: their types' default) prefixes.
ATTENTION = {
    ("per_task", ()): {"task_cls": "joint", "task_ner": "separate", "task_qa": "separate"},
    ("shared", ()): {"shared": "joint"},  # three types that disagree: P-Tuning v2's joint
    ("hybrid", ()): {"shared": "joint", "task_cls": "joint", "task_ner": "separate", "task_qa": "separate"},
    ("per_task", ("prefix.attention=separate",)): {"task_cls": "separate", "task_ner": "separate",
                                                   "task_qa": "separate"},
}


@pytest.mark.parametrize("mode, overrides", list(ATTENTION))
def test_joint_run_writes_reports_checkpoint_and_predicts_identically(tmp_path, mode, overrides):
    config = write_project(tmp_path, mode=mode)
    run_dir = tmp_path / "run"
    trainer = make_trainer(config, run_dir, overrides)
    assert trainer.model.prefix_bank.layout.attention == ATTENTION[mode, overrides]
    trainer.train()

    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["tasks"]) == {"cls", "ner", "qa"}
    for name, kind, metric in (("cls", "classification", "accuracy"), ("ner", "ner", "f1"), ("qa", "qa", "f1")):
        task = report["tasks"][name]
        assert (task["type"], task["main_metric"]) == (kind, metric)
        assert 0.0 <= task["metrics"]["validation"][metric] <= 1.0
    assert 0.0 <= report["aggregate"]["validation"] <= 1.0
    assert "data:image/png;base64," in (run_dir / "report.html").read_text()
    assert "| cls | classification |" in (run_dir / "report.md").read_text()

    weights = load_file(str(run_dir / "checkpoint" / "model.safetensors"))
    assert not any(key.startswith("encoder.") for key in weights)
    assert (run_dir / "checkpoint" / "model.safetensors").stat().st_size < 2_000_000
    meta = json.loads((run_dir / "checkpoint" / "meta.json").read_text())
    assert meta["encoder"]["fingerprint"] and [t["labels"] for t in meta["tasks"]][0] == ["0", "1"]

    run = load_run(run_dir)
    assert run.model.prefix_bank.layout.attention == ATTENTION[mode, overrides]
    if overrides:  # a run saved before attention was per prefix recorded one setting for all: it still loads
        meta["prefix_layout"]["attention"] = "separate"
        (run_dir / "checkpoint" / "meta.json").write_text(json.dumps(meta))
        assert set(load_run(run_dir).model.prefix_bank.layout.attention.values()) == {"separate"}
    saved = [json.loads(line) for line in (run_dir / "predictions" / "cls.validation.jsonl").read_text().splitlines()]
    again = run.predict("cls", [{"text": row["text"]} for row in saved])
    assert [p["label"] for p in again] == [row["label"] for row in saved]
    assert [p["score"] for p in again] == pytest.approx([row["score"] for row in saved], abs=1e-6)
    ner = run.predict("ner", [{"text": "john smith was born in paris"}, {"tokens": ["london", "is", "a", "city"]}])
    assert [len(p["tags"]) for p in ner] == [6, 4]
    qa = run.predict("qa", [{"question": "where was john born ?", "context": "john smith was born in london ."}])
    assert qa[0]["answer"] in "john smith was born in london ."


@pytest.mark.parametrize("mode, extra", [("per_task", []), ("shared", ["optimization.balance_shared=true"]),
                                         ("per_task", ["optimization.ema_decay=0.9"])])
def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path, mode, extra):
    config = write_project(tmp_path, mode=mode)
    overrides = ["evaluation.checkpoint_every=2", *extra]
    uninterrupted = make_trainer(config, tmp_path / "a", overrides)
    uninterrupted.train()

    class Killed(Exception):
        pass

    def kill_at_step_7(step: int) -> None:
        if step == 7:
            raise Killed

    with pytest.raises(Killed):
        make_trainer(config, tmp_path / "b", overrides, on_step=kill_at_step_7).train()
    # A write killed mid-way leaves its temporary file beside the target: resuming removes it.
    stale = [tmp_path / "b" / ".report.json.x1.tmp", tmp_path / "b" / "state" / ".training_state.pt.x2.tmp"]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    resumed = make_trainer(config, tmp_path / "b", overrides, resume=True)
    assert resumed.step == 6 and not any(path.exists() for path in stale)
    resumed.train()

    report_a = json.loads((tmp_path / "a" / "report.json").read_text())
    report_b = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report_a["tasks"] == report_b["tasks"]
    final_a, final_b = trainable_state(uninterrupted.model), trainable_state(resumed.model)
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_existing_run_is_not_overwritten_without_resume(tmp_path):
    config = write_project(tmp_path, max_steps=2)
    make_trainer(config, tmp_path / "run").train()
    with pytest.raises(CheckpointError, match="already holds a run; pass --resume"):
        make_trainer(config, tmp_path / "run")


def test_resume_with_a_changed_config_lists_the_keys_that_differ(tmp_path):
    config = write_project(tmp_path, max_steps=2)
    make_trainer(config, tmp_path / "run").train()
    changed = ["optimization.prefix_lr=0.02", "tasks.0.batch_size=2"]
    with pytest.raises(CheckpointError, match=r"keys: optimization\.prefix_lr, tasks\.0\.batch_size\); resume with the same"):
        make_trainer(config, tmp_path / "run", changed, resume=True)
    make_trainer(config, tmp_path / "run", resume=True)  # the same config resumes


def test_checkpoint_refuses_a_different_encoder(tmp_path):
    config = write_project(tmp_path, max_steps=2)
    make_trainer(config, tmp_path / "run").train()
    with pytest.raises(CheckpointError, match="fingerprint"):
        load_run(tmp_path / "run", encoder=tiny_encoder("bert", seed=99))


def test_set_overrides_reach_the_config(tmp_path):
    config = write_project(tmp_path)
    experiment = load_config(ExperimentConfig, config, ["optimization.max_steps=3", "tasks.0.batch_size=2",
                                                        "prefix.mode=hybrid", "optimization.prefix_lr=5e-3"])
    assert experiment.optimization.max_steps == 3 and experiment.tasks[0].batch_size == 2
    assert experiment.prefix.mode == "hybrid" and experiment.optimization.prefix_lr == 0.005


def test_cli_train_then_evaluate_and_predict(tmp_path, capsys):
    config = write_project(tmp_path, max_steps=4)
    run_dir = tmp_path / "cli-run"
    assert main(["train", str(config), "--output-dir", str(run_dir), "--no-progress"]) == 0
    assert main(["evaluate", str(run_dir), "--output-dir", str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["tasks"].keys() == {"cls", "ner", "qa"}
    data_file = tmp_path / "data" / "cls" / "dev.tsv"
    assert main(["evaluate", str(run_dir), "--task", "cls", "--file", str(data_file), "--split-name", "extra",
                 "--output-dir", str(tmp_path / "eval2")]) == 0
    assert "extra" in json.loads((tmp_path / "eval2" / "report.json").read_text())["tasks"]["cls"]["metrics"]
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"text": "good movie"}\n"bad film"\n', encoding="utf-8")
    assert main(["predict", str(run_dir), "--task", "cls", "--input", str(inputs), "--output",
                 str(tmp_path / "out.jsonl")]) == 0
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optimization.schedule=cosin", "key 'optimization.schedule': expected one of 'linear', 'cosine', 'constant'"),
        ("prefix.mod=shared", "key 'prefix.mod': unknown key (did you mean 'mode'?)"),
        ("tasks.0.batch_size=many", "key 'tasks.0.batch_size': expected int, got 'many'"),
    ],
)
def test_broken_config_gets_one_clear_line(tmp_path, capsys, override, expected):
    config = write_project(tmp_path, max_steps=2)
    capsys.readouterr()  # drop what saving the tiny encoder printed
    assert main(["train", str(config), "--set", override, "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error and "Traceback" not in error
    assert expected in error


def test_broken_task_file_names_file_line_and_key(tmp_path, capsys):
    config = write_project(tmp_path, max_steps=2)
    task_file = tmp_path / "tasks" / "cls.yaml"
    task_file.write_text(task_file.read_text().replace("max_length: 16", "max_lenght: 16"))
    assert main(["train", str(config), "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert "cls.yaml:7: key 'max_lenght': unknown key (did you mean 'max_length'?)" in error


def test_the_training_bar_redraws_rarely_into_a_log_file(tmp_path, capsys):
    """Into a file (pytest's capture is not a terminal) a 12-step run draws its bar a handful of times, not per step."""
    config = write_project(tmp_path)
    experiment = load_config(ExperimentConfig, config, ["optimization.max_steps=12", "evaluation.every_steps=null"])
    Trainer(experiment, tmp_path / "run", config_path=config, progress=True).train()
    bar_lines = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.startswith("train:")]
    assert 1 <= len(bar_lines) <= 4
