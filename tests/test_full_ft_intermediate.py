"""`multitask compare`'s full_ft_intermediate (STILTs): full fine-tuning on the base's closest task, then on the
experiment's own tasks from that encoder (encoder.init_from); and its one-line refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from multitask.checkpoint import read_checkpoint
from multitask.compare import MethodSkipped, compare, method_experiment, train_run
from multitask.config import from_dict, load_config
from multitask.errors import CheckpointError, ConfigError
from multitask.experiment import ExperimentConfig
from multitask.reporting.comparison import render_comparison_markdown
from multitask.training.trainer import Trainer
from tests.fixtures import write_project
from tests.test_grow import write_grow_config  # an experiment that grows a base (cls and ner) by qa

STAGE1 = "full_ft_intermediate/stage1"


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    config = write_project(tmp_path_factory.mktemp("intermediate"), max_steps=4)
    return config.parent.parent


@pytest.fixture(scope="module")
def base(project) -> Path:
    """A prefix run of cls and ner (qa arrives later)."""
    text = (project / "configs" / "exp.yaml").read_text().replace("  - {file: ../tasks/qa.yaml, batch_size: 4}\n", "")
    config = project / "configs" / "base.yaml"
    config.write_text(text)
    run_dir = project / "runs" / "base"
    Trainer(load_config(ExperimentConfig, config), run_dir, config_path=config, progress=False).train()
    return run_dir


@pytest.fixture(scope="module")
def compared(project, base) -> tuple[Path, dict]:
    config = write_grow_config(project, base, transfer="task_ner")
    output = project / "cmp"
    results = compare(load_config(ExperimentConfig, config), ["full_ft_intermediate"], output, config_path=config,
                      in_process=True)
    return output, results


def test_stage1_fine_tunes_the_named_base_task_and_stage2_the_new_tasks(compared):
    output, results = compared
    stage1 = json.loads((output / "runs" / STAGE1 / "report.json").read_text())
    stage2 = json.loads((output / "runs" / "full_ft_intermediate" / "report.json").read_text())
    assert set(stage1["tasks"]) == {"ner"} and set(stage2["tasks"]) == {"qa"}
    first = json.loads((output / "runs" / STAGE1 / "config.json").read_text())
    assert first["method"] == "full_ft" and first["base"] is None and first["encoder"]["init_from"] is None
    config = json.loads((output / "runs" / "full_ft_intermediate" / "config.json").read_text())
    assert config["method"] == "full_ft" and config["base"] is None
    assert config["encoder"]["init_from"] == str(output / "runs" / STAGE1)
    cells = results["methods"]["full_ft_intermediate"]["tasks"]
    assert set(cells) == {"qa"}  # the intermediate task is a means, not a result
    assert cells["qa"]["train_time_s"] > stage1["meta"]["train_time_s"]  # stage 2 counts on from stage 1
    assert "| full_ft_intermediate |" in (output / "comparison.md").read_text()


def test_stage2_encoder_starts_exactly_from_stage1s_fine_tuned_encoder(compared, tmp_path):
    output, _ = compared
    config = json.loads((output / "runs" / "full_ft_intermediate" / "config.json").read_text())
    trainer = Trainer(from_dict(ExperimentConfig, config), tmp_path / "again", progress=False)  # no step taken
    _, weights = read_checkpoint(output / "runs" / STAGE1)
    saved = {name[len("encoder."):]: value for name, value in weights.items() if name.startswith("encoder.")}
    own = dict(trainer.model.encoder.named_parameters())
    assert saved and set(saved) <= set(own)
    for name, value in saved.items():
        assert torch.equal(own[name].detach().cpu(), value), name
    pretrained = Trainer(from_dict(ExperimentConfig, {**config, "encoder": {**config["encoder"], "init_from": None}}),
                         tmp_path / "pretrained", progress=False).model.encoder.state_dict()
    assert any(not torch.equal(pretrained[name], value) for name, value in saved.items())  # stage 1 trained it


def test_auto_takes_the_base_tasks_prefix_transfer_chose(project, base, compared, tmp_path):
    config = write_grow_config(project, base, transfer="auto", name="auto")
    (label, stage1), _ = method_experiment(load_config(ExperimentConfig, config), "full_ft_intermediate", config)
    report = json.loads((compared[0] / "runs" / "full_ft_intermediate" / "report.json").read_text())
    transfer_run = tmp_path / "runs" / "prefix_transfer"
    transfer_run.mkdir(parents=True)

    def with_source(source: str) -> None:
        report["meta"]["transfer"] = {"qa": {"setting": "auto", "source": source}}
        (transfer_run / "report.json").write_text(json.dumps(report))

    with_source("task_cls")
    train_run(label, stage1, tmp_path, in_process=True)
    assert set(json.loads((tmp_path / "runs" / STAGE1 / "report.json").read_text())["tasks"]) == {"cls"}
    with_source("none")  # found out before stage 1 trains (this one's run directory is taken already)
    with pytest.raises(MethodSkipped, match="auto found no base task closer than a fresh start"):
        train_run(label, stage1, tmp_path, in_process=True)


def test_a_skipped_method_says_why_in_the_table():
    results = {"split": "validation", "experiment": "x", "methods": {"full_ft_intermediate": {
        "tasks": {}, "skipped": "prefix_transfer's auto found no base task closer than a fresh start"}}}
    assert "- full_ft_intermediate was not trained: prefix_transfer's auto found" in render_comparison_markdown(results)


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_refusals_are_one_line(project, base, tmp_path):
    config = write_grow_config(project, base, transfer="task_ner", name="refused")
    without_base = load_config(ExperimentConfig, config, ["base=null"])
    with pytest.raises(ConfigError) as error:
        method_experiment(without_base, "full_ft_intermediate", config)
    assert "full_ft_intermediate fine-tunes on the base's closest task first: set base" in one_line(error)
    for transfer in ("mixture", "task_qa"):
        named = load_config(ExperimentConfig, config, [f"prefix.transfer={transfer}"])
        with pytest.raises(ConfigError) as error:
            method_experiment(named, "full_ft_intermediate", config)
        assert "names no task of base" in one_line(error) and "task_<name>" in one_line(error)
    auto = load_config(ExperimentConfig, config, ["prefix.transfer=auto"])
    with pytest.raises(ConfigError) as error:  # refused before anything trains
        compare(auto, ["full_ft_intermediate", "prefix_transfer"], tmp_path / "cmp", config_path=config,
                in_process=True)
    assert "list prefix_transfer before full_ft_intermediate in --methods" in one_line(error)
    assert not (tmp_path / "cmp" / "runs").exists()


def test_encoder_init_from_refusals_are_one_line(project, base, compared, tmp_path):
    stage1 = compared[0] / "runs" / STAGE1
    config = json.loads((compared[0] / "runs" / "full_ft_intermediate" / "config.json").read_text())

    def refusal(name: str, run: Path, method: str = "full_ft", encoder: Path | None = None) -> str:
        settings = {**config["encoder"], "init_from": str(run), **({"name": str(encoder)} if encoder else {})}
        experiment = from_dict(ExperimentConfig, {**config, "method": method, "encoder": settings})
        with pytest.raises((ConfigError, CheckpointError)) as error:
            Trainer(experiment, tmp_path / name, progress=False)
        return one_line(error)

    assert "only a full_ft run saves a fine-tuned encoder" in refusal("prefix-run", base)
    assert "only a full fine-tuning run (method: full_ft)" in refusal("probe", stage1, method="linear_probe")
    renamed = tmp_path / "encoder-copy"
    shutil.copytree(project / "encoder", renamed)
    message = refusal("renamed", stage1, encoder=renamed)
    assert "that run fine-tuned encoder" in message and "name the same encoder" in message
