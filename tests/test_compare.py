"""`multitask compare`: every method trains on the tiny project and changes only the weights it should."""

from __future__ import annotations

import json

import pytest
import torch

from multitask.compare import METHODS, compare, method_experiment, parse_methods
from multitask.config import load_config
from multitask.errors import ConfigError
from multitask.experiment import ExperimentConfig
from multitask.runtime import build_model, load_tasks
from multitask.training.optim import build_optimizer
from multitask.tuning import resolve_tuning
from tests.fixtures import write_project
from tests.tiny import tiny_encoder


def trained_names_after_steps(method: str, config_path) -> tuple[set[str], set[str]]:
    """(names of encoder weights that changed, names of parameters that were trainable) after 2 steps."""
    experiment = load_config(ExperimentConfig, config_path, [f"method={method}"])
    tasks = [task for _, task, _ in load_tasks(experiment, config_path)]
    for task in tasks:
        task.labels = task.labels or (["O", "B-PER", "I-PER", "B-LOC"] if task.config.type == "ner" else ["0", "1"])
    model = build_model(experiment, tasks, tiny_encoder("bert"))
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    optimizer = build_optimizer(model, experiment.optimization, resolve_tuning(experiment, tasks))
    inputs = torch.randint(5, 60, (4, 8))
    for _ in range(2):
        optimizer.zero_grad()
        from multitask.model import ModelInputs
        outputs = model(ModelInputs(inputs, torch.ones_like(inputs), torch.tensor([0, 1, 2, 0])))
        sum(logits.pow(2).mean() for logits, _ in outputs.values()).backward()
        optimizer.step()
    changed = {k for k, v in model.encoder.state_dict().items() if k in before and not torch.equal(v, before[k])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return changed, trainable


def test_each_method_trains_only_its_parameters(tmp_path):
    config = write_project(tmp_path)
    changed, trainable = trained_names_after_steps("full_ft", config)
    assert changed and any(n.startswith("encoder.") for n in trainable)
    for method in ("prefix", "linear_probe"):
        changed, trainable = trained_names_after_steps(method, config)
        assert not changed, method
        assert all(n.startswith(("prefix_bank.", "heads.")) for n in trainable), method
    changed, trainable = trained_names_after_steps("lora", config)
    assert changed and all(".lora_" in name for name in changed)
    assert all(n.startswith("heads.") or ".lora_" in n for n in trainable)
    assert any(".lora_" in n for n in trainable)


def test_compare_writes_every_method_and_task_cell(tmp_path):
    config = write_project(tmp_path, max_steps=4)
    experiment = load_config(ExperimentConfig, config)
    # The tiny encoder has 2 layers; prefix_transfer and full_ft_intermediate need a base run (tests/test_grow.py,
    # tests/test_full_ft_intermediate.py).
    methods = [m for m in METHODS.available()
               if not m.endswith(("top2", "top3")) and m not in ("prefix_transfer", "full_ft_intermediate")]
    results = compare(experiment, methods, tmp_path / "cmp", config_path=config, in_process=True,
                      encoder_factory=lambda: tiny_encoder("bert"))
    saved = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert saved == json.loads(json.dumps(results))
    for method in methods:
        cells = saved["methods"][method]["tasks"]
        assert set(cells) == {"cls", "ner", "qa"}, method
        for cell in cells.values():
            assert 0.0 <= cell["score"] <= 1.0 and cell["wall_time_s"] > 0 and cell["checkpoint_bytes"] > 0
            assert cell["trainable_parameters"] > 0
    lora, full = saved["methods"]["lora"]["tasks"]["cls"], saved["methods"]["full_ft"]["tasks"]["cls"]
    assert lora["trainable_parameters"] < full["trainable_parameters"]
    assert (tmp_path / "cmp" / "comparison.png").read_bytes().startswith(b"\x89PNG")
    assert "| prefix_single |" in (tmp_path / "cmp" / "comparison.md").read_text()
    top = saved["methods"]["prefix_top1"]["tasks"]["cls"]
    assert top["frozen_cache_bytes"] > 0 and top["step_time_s"] > 0
    staged = saved["methods"]["prefix_shared_then_top1"]["tasks"]["cls"]
    stage1 = json.loads((tmp_path / "cmp" / "runs" / "prefix_shared_then_top1" / "stage1" / "report.json").read_text())
    assert staged["train_time_s"] > stage1["meta"]["train_time_s"]  # stage 2 counts on from stage 1
    stage2 = json.loads((tmp_path / "cmp" / "runs" / "prefix_shared_then_top1" / "stage2" / "config.json").read_text())
    assert stage2["prefix"]["init_from"] == str(tmp_path / "cmp" / "runs" / "prefix_shared_then_top1" / "stage1")
    assert stage2["prefix"]["freeze"] == ["shared"] and stage2["prefix"]["mode"] == "hybrid"


def test_prefix_single_trains_one_run_per_task(tmp_path):
    config = write_project(tmp_path)
    runs = method_experiment(load_config(ExperimentConfig, config), "prefix_single", config)
    assert [len(experiment.tasks) for _, experiment in runs] == [1, 1, 1]
    assert [experiment.optimization.max_steps for _, experiment in runs] == [4, 4, 4]  # 12 joint steps / 3 tasks


def test_method_overrides_apply_to_their_method_only(tmp_path):
    config = write_project(tmp_path)
    experiment = load_config(ExperimentConfig, config, ["method_overrides.full_ft.optimization.head_lr=3e-5"])
    (_, full), = method_experiment(experiment, "full_ft", config)
    (_, lora), = method_experiment(experiment, "lora", config)
    assert full.optimization.head_lr == 3e-5 and lora.optimization.head_lr == 0.01


def test_unknown_method_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown comparison method 'adapters'; known: full_ft, "
                                          "full_ft_intermediate, linear_probe, lora"):
        parse_methods("lora,adapters")
