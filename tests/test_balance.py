"""Task-balanced gradients on shared prefixes (optimization.balance_shared)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from multitask.config import load_config
from multitask.errors import ConfigError
from multitask.experiment import ExperimentConfig
from multitask.training.balance import SharedGradientBalancer
from tests.fixtures import write_project
from tests.test_training import make_trainer


def test_every_task_reaches_the_common_scale_and_its_direction_is_kept():
    shared = torch.nn.Parameter(torch.zeros(4))
    balancer = SharedGradientBalancer([shared])
    scales = {"qa": 10.0, "cls": 0.1}
    norms = {}
    for _ in range(30):  # round robin, the running averages settle on each task's norm
        for task, scale in scales.items():
            direction = torch.tensor([1.0, -2.0, 0.5, 3.0]) if task == "qa" else torch.tensor([0.0, 1.0, 1.0, 0.0])
            shared.grad = direction * scale
            balancer(task)
            norms[task] = float(shared.grad.norm())
            assert torch.nn.functional.cosine_similarity(shared.grad, direction, dim=0) == pytest.approx(1.0)
    common = (10.0 * float(torch.tensor([1.0, -2.0, 0.5, 3.0]).norm()) + 0.1 * 2**0.5) / 2
    assert norms["qa"] == pytest.approx(common, rel=1e-4) and norms["cls"] == pytest.approx(common, rel=1e-4)
    state = balancer.state_dict()
    restored = SharedGradientBalancer([shared])
    restored.load_state_dict(state)
    assert restored.norms == balancer.norms


def test_a_partial_strength_moves_each_task_part_of_the_way_on_a_log_scale():
    shared = torch.nn.Parameter(torch.zeros(1))
    balancer = SharedGradientBalancer([shared], strength=0.5)
    shared.grad = torch.tensor([4.0])
    assert balancer("qa") == pytest.approx(1.0)  # alone, a task is its own common scale
    shared.grad = torch.tensor([1.0])
    # running norms: qa 4, cls 1 (first step of each); common scale 2.5; cls gets (2.5 / 1) ** 0.5
    assert balancer("cls") == pytest.approx(2.5**0.5) and float(shared.grad) == pytest.approx(2.5**0.5)
    with pytest.raises(ValueError, match="strength"):
        SharedGradientBalancer([shared], strength=1.5)


def test_a_zero_or_overflowed_gradient_is_left_alone():
    shared = torch.nn.Parameter(torch.zeros(2))
    balancer = SharedGradientBalancer([shared])
    for grad in (torch.zeros(2), torch.tensor([float("inf"), 1.0])):
        shared.grad = grad.clone()
        assert balancer("cls") == 1.0 and torch.equal(shared.grad, grad) and balancer.norms == {}


def test_only_prefixes_several_tasks_share_are_balanced(tmp_path):
    config = write_project(tmp_path, mode="hybrid")
    trainer = make_trainer(config, tmp_path / "run", ["optimization.balance_shared=true"])
    bank = trainer.model.prefix_bank
    assert {id(p) for p in trainer.balancer.parameters} == {id(p) for p in bank.encoders["shared"].parameters()}
    name, loss = trainer.train_step()
    assert trainer.balancer.norms.keys() == {name} and loss > 0
    per_task = write_project(tmp_path / "per_task", mode="per_task")
    assert make_trainer(per_task, tmp_path / "run2", ["optimization.balance_shared=true"]).balancer is None


def test_a_strength_outside_0_1_is_a_one_line_config_error():
    shipped = Path(__file__).resolve().parents[1] / "configs" / "quickstart_shared.yaml"
    with pytest.raises(ConfigError, match=r"quickstart_shared\.yaml:\d+: key 'optimization': balance_strength must be "
                       r"in \[0, 1\], got 1\.5$"):
        load_config(ExperimentConfig, shipped, ["optimization.balance_strength=1.5"])
