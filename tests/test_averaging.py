"""The running average of the trained weights (optimization.ema_decay): its arithmetic, and what a run saves."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tests.fixtures import write_project
from tests.test_training import make_trainer
from multitask.training.averaging import WeightAverage


def model_with_a_frozen_part() -> nn.Module:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    model[0].requires_grad_(False)
    return model


def test_the_average_follows_the_ramped_decay_and_skips_frozen_weights():
    model = model_with_a_frozen_part()
    average = WeightAverage(model, decay=0.9)
    assert set(average.shadow) == {"1.weight", "1.bias"}
    start = model[1].weight.detach().clone()
    expected = start.clone()
    for update, value in enumerate([1.0, 2.0, 3.0, 4.0], start=1):
        with torch.no_grad():
            model[1].weight.fill_(value)
        average.update()
        decay = min(0.9, (1 + update) / (10 + update))  # 2/11, 3/12, 4/13, 5/14: the ramp, below 0.9
        expected = decay * expected + (1 - decay) * value
        assert torch.allclose(average.shadow["1.weight"], expected)
    assert average.current_decay() == pytest.approx(min(0.9, 5 / 14))


def test_applied_swaps_the_average_in_and_restores_the_trained_weights_even_on_error():
    model = model_with_a_frozen_part()
    average = WeightAverage(model, decay=0.5)
    with torch.no_grad():
        model[1].weight.fill_(3.0)
    trained = model[1].weight.detach().clone()
    average.update()
    with pytest.raises(RuntimeError), average.applied():
        assert torch.equal(model[1].weight, average.shadow["1.weight"])
        assert not torch.equal(model[1].weight, trained)
        raise RuntimeError("evaluation failed")
    assert torch.equal(model[1].weight, trained)


def test_state_round_trips():
    model = model_with_a_frozen_part()
    average = WeightAverage(model, decay=0.9)
    with torch.no_grad():
        model[1].bias.fill_(5.0)
    average.update()
    copy = WeightAverage(model_with_a_frozen_part(), decay=0.9)
    copy.load_state_dict(average.state_dict())
    assert copy.updates == 1 and torch.equal(copy.shadow["1.bias"], average.shadow["1.bias"])


@pytest.mark.parametrize("decay", [0.0, 1.0, 1.5])
def test_a_decay_outside_0_1_is_refused(decay):
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(model_with_a_frozen_part(), decay)


def test_a_run_evaluates_and_saves_the_average_and_keeps_training_the_raw_weights(tmp_path):
    config = write_project(tmp_path, max_steps=6)
    trainer = make_trainer(config, tmp_path / "run", ["optimization.ema_decay=0.8", "evaluation.every_steps=6"])
    head = next(name for name in trainer.average.shadow if name.startswith("heads.cls."))
    raw, averaged = {}, {}
    trainer.on_step = lambda step: raw.update({step: trainer.average.parameters[head].detach().clone()})
    finish = trainer.finish
    trainer.finish = lambda: (averaged.update({head: trainer.average.shadow[head].clone()}), finish())[1]
    trainer.train()
    saved = load_file(str(tmp_path / "run" / "checkpoint" / "model.safetensors"))
    assert torch.equal(saved[head], averaged[head])  # the checkpoint holds the average (one evaluation, at step 6)
    assert not torch.equal(saved[head], raw[6])      # not the last step's weights
    assert trainer.average.updates == 6
