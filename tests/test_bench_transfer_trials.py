"""bench/transfer_trials.py's plan syntax."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from multitask.training.prefix_transfer import TrialPlan

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "transfer_trials.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("transfer_trials", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plans_name_the_evidence_or_a_trials_steps_folds_and_criterion():
    parse_plan = load_bench().parse_plan
    assert parse_plan("evidence") == TrialPlan(0, criterion="evidence")
    assert parse_plan("50x3:metric") == TrialPlan(50, 3, "metric")
    assert parse_plan("20:loss") == TrialPlan(20, None, "loss")
    assert parse_plan("60") == TrialPlan(60, None, "metric")
    assert load_bench().cell({"evidence": 1.401647}) == "1.4016"
