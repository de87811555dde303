"""Time budgets, the progress-driven LR schedule, precision auto, per-task-type defaults, compare --budget-minutes."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from multitask.compare import compare, with_budget
from multitask.config import load_config
from multitask.experiment import ExperimentConfig, OptimizationConfig
from multitask.precision import resolve_precision
from multitask.reporting.comparison import time_to_reach
from multitask.runtime import load_tasks
from multitask.tasks.ner import NerTask
from multitask.training.optim import ProgressSchedule
from multitask.training.trainer import Trainer
from multitask.tuning import resolve_tuning
from tests.fixtures import write_project
from tests.tiny import tiny_encoder


def schedule(schedule_name: str, warmup: float, first_step: float = 0.1) -> ProgressSchedule:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return ProgressSchedule(optimizer, OptimizationConfig(max_steps=10, schedule=schedule_name), warmup, first_step)


def test_schedule_follows_the_fraction_of_training_done():
    linear = schedule("linear", warmup=0.2)
    assert [round(linear.factor(p), 4) for p in (0.0, 0.1, 0.2, 0.6, 1.0)] == [0.3333, 0.6667, 1.0, 0.5, 0.0]
    assert schedule("cosine", warmup=0.0).factor(0.5) == pytest.approx(0.5)
    assert schedule("constant", warmup=0.0).factor(0.9) == 1.0
    linear.update(0.6)
    assert linear.get_last_lr() == [pytest.approx(0.5)]
    restored = schedule("linear", warmup=0.2)
    restored.load_state_dict(linear.state_dict())
    assert restored.get_last_lr() == linear.get_last_lr()


@pytest.mark.parametrize("flags,device,expected", [
    ({"avx512f", "avx512_bf16"}, "cpu", "bf16"), ({"amx_bf16"}, "cpu", "bf16"), ({"avx2"}, "cpu", "fp32"),
    (set(), "cpu", "fp32"),
])
def test_precision_auto_picks_bf16_only_where_native(flags, device, expected):
    precision, reason = resolve_precision("auto", torch.device(device), flags)
    assert precision == expected and reason.startswith("auto")
    assert resolve_precision("fp32", torch.device(device), flags) == ("fp32", "set in the experiment")


class SteadyClock:
    """The trainer's clock, advancing a fixed 0.1 s per reading: a time budget then means the same steps on any
    machine, however loaded (a real clock on a busy 2-core machine can put one step past two evaluation periods)."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 0.1
        return self.now


def test_time_budget_stops_at_the_first_step_past_it_and_times_phases_apart(tmp_path, monkeypatch):
    import multitask.training.trainer as trainer_module

    config = write_project(tmp_path)
    experiment = load_config(ExperimentConfig, config, [
        "optimization.max_steps=null", "optimization.max_minutes=0.02", "evaluation.every_steps=null",
        "evaluation.every_minutes=0.01"])
    monkeypatch.setattr(trainer_module, "time", SteadyClock())
    trainer = Trainer(experiment, tmp_path / "run", config_path=config, progress=False, encoder=tiny_encoder("bert"))
    report = trainer.train()
    meta = report.meta
    assert meta["train_time_s"] >= 0.02 * 60
    assert trainer.scheduler.progress < 1.0 <= trainer.progress_done()  # the last step started inside the budget
    assert meta["evaluation_time_s"] > 0 and meta["preparation_time_s"] > 0
    minutes = [float(m) for m in meta["evaluation_minutes"].values()]
    assert len(minutes) >= 2 and minutes == sorted(minutes) and minutes[-1] >= 0.02
    assert meta["precision"] == "fp32"


def test_per_task_type_defaults_task_file_and_experiment_override(tmp_path, caplog):
    config = write_project(tmp_path)
    experiment = load_config(ExperimentConfig, config, [
        "optimization.prefix_lr=null", "optimization.head_lr=0.005", "optimization.warmup_ratio=null",
        "tasks.1.overrides.prefix.lr=0.03"])
    tasks = [task for _, task, _ in load_tasks(experiment, config)]
    tunings = resolve_tuning(experiment, tasks)
    cls, ner, qa = (tunings[name] for name in ("cls", "ner", "qa"))
    assert ner.prefix_lr == 0.03 and ner.sources["prefix_lr"] == "task file"
    assert cls.prefix_lr == type(tasks[0]).tuning_defaults.prefix_lr and cls.sources["prefix_lr"] == "classification default"
    assert {t.head_lr for t in (cls, ner, qa)} == {0.005} and cls.sources["head_lr"] == "experiment"
    assert ner.warmup_ratio == NerTask.tuning_defaults.warmup_ratio
    assert cls.prefix_length == 4 and cls.sources["prefix_length"] == "experiment"
    with caplog.at_level(logging.INFO, logger="multitask.tuning"):
        trainer = Trainer(experiment, tmp_path / "run", config_path=config, progress=False, encoder=tiny_encoder("bert"))
    assert "settings applied: task ner: prefix_length 4 (experiment)" in caplog.text
    rates = set(trainer.scheduler.base_lrs)
    assert 0.03 in rates and 0.005 in rates


def test_prefix_attention_per_task_type_experiment_and_task_file(tmp_path):
    config = write_project(tmp_path)

    def attention(*overrides):
        experiment = load_config(ExperimentConfig, config, list(overrides))
        tunings = resolve_tuning(experiment, [task for _, task, _ in load_tasks(experiment, config)])
        return {name: (t.prefix_attention, t.sources["prefix_attention"]) for name, t in tunings.items()}

    assert attention() == {"cls": ("joint", "classification default"), "ner": ("separate", "ner default"),
                           "qa": ("separate", "qa default")}
    assert attention("prefix.attention=joint", "tasks.2.overrides.prefix.attention=separate") == {
        "cls": ("joint", "experiment"), "ner": ("joint", "experiment"), "qa": ("separate", "task file")}


def test_compare_with_a_time_budget_gives_each_method_a_learning_curve(tmp_path, monkeypatch):
    import multitask.training.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "time", SteadyClock())  # the same steps on any machine (see SteadyClock)
    config = write_project(tmp_path)
    experiment = load_config(ExperimentConfig, config)
    budgeted = with_budget(experiment, 0.02)
    assert budgeted.optimization.max_steps is None and budgeted.evaluation.every_minutes == pytest.approx(0.02 / 6)
    results = compare(experiment, ["prefix_per_task", "linear_probe"], tmp_path / "cmp", config_path=config,
                      in_process=True, encoder_factory=lambda: tiny_encoder("bert"), budget_minutes=0.02)
    for method in ("prefix_per_task", "linear_probe"):
        for cell in results["methods"][method]["tasks"].values():
            assert len(cell["curve"]) >= 2 and cell["train_time_s"] >= 0.02 * 60
    markdown = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "## Learning curves against training time" in markdown and "Time to target" in markdown
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text())["budget_minutes"] == 0.02


def test_time_to_reach_is_the_first_evaluation_at_the_target():
    assert time_to_reach([[1.0, 0.5], [2.0, 0.8], [3.0, 0.9]], 0.75) == 2.0
    assert time_to_reach([[1.0, 0.5]], 0.75) is None


@pytest.mark.parametrize("sampler", ["round_robin", "proportional"])
def test_epochs_are_passes_over_the_largest_task_under_every_sampler(tmp_path, sampler):
    config = write_project(tmp_path)
    experiment = load_config(ExperimentConfig, config, ["optimization.max_steps=null", "optimization.epochs=2",
                                                        f"sampler.name={sampler}"])
    trainer = Trainer(experiment, tmp_path / "run", config_path=config, progress=False, encoder=tiny_encoder("bert"))
    largest = max(trainer.tasks, key=lambda t: len(t.features["train"]))
    batches = math.ceil(len(largest.features["train"]) / largest.batch_size)
    share = trainer.sampler.probabilities()[largest.name]
    assert trainer.total_steps == math.ceil(2 * batches / share)
    if sampler == "round_robin":  # three tasks: the largest trains on every third step
        assert share == pytest.approx(1 / 3) and trainer.total_steps == 6 * batches
