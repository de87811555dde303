"""bench/grow_transfer.py's bookkeeping: the sweep reuses auto's run for its pick, and its table names the best start."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("grow_transfer", REPO / "bench" / "grow_transfer.py")
grow_transfer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(grow_transfer)


def row(method: str, seed: int, best: float, source: str | None = None, within_noise=None,
        trials_best=None) -> dict:
    return {"target": "trec_coarse", "size": 100, "method": method, "seed": seed, "best": best, "source": source,
            "within_noise": within_noise, "trials_best": trials_best or source, "wall_time_s": 1.0,
            "preparation_time_s": None, "best_step": 1}


def test_the_sweep_reuses_auto_s_run_only_for_the_source_it_picked(tmp_path):
    run = tmp_path / "auto" / "13"
    run.mkdir(parents=True)
    (run / "report.json").write_text(json.dumps({"meta": {"transfer": {"t": {"source": "task_sst2"}}}}))
    assert grow_transfer.auto_run_that_picked(tmp_path, 13, "task_sst2") == run
    assert grow_transfer.auto_run_that_picked(tmp_path, 13, "task_squad") is None
    assert grow_transfer.auto_run_that_picked(tmp_path, 21, "task_sst2") is None


def test_the_sweep_table_names_the_best_start_and_auto_s_gap_to_it():
    rows = [row("scratch", 13, 65.6), row("auto", 13, 65.6, "none", ["task_sst2"]),
            row("from task_sst2", 13, 70.0), row("from task_squad", 13, 60.8)]
    methods = ["scratch", "auto", "from task_sst2", "from task_squad"]
    line = grow_transfer.sweep_table(rows, methods).strip().splitlines()[-1]
    assert line == ("| trec_coarse | 100 | 13 | 65.6 | 70.0 | 60.8 | from task_sst2 | none (65.6) | -4.4 | none | "
                    "task_sst2 |")
    prior = [*rows[:1], row("auto", 13, 70.0, "task_sst2", ["task_sst2"], trials_best="none"), *rows[2:]]
    line = grow_transfer.sweep_table(prior, methods).strip().splitlines()[-1]
    assert line.endswith("| from task_sst2 | task_sst2 (70.0) | +0.0 | none | task_sst2 |")
    assert grow_transfer.sweep_table(rows, ["scratch", "auto"]) == ""


def test_set_changes_every_run_or_only_the_named_method_s():
    args = argparse.Namespace(limit_eval=500, batch_size=32, steps=400, every=50, precision="auto", base="runs/base",
                              set=["optimization.ema_decay=0.98", "prefix:optimization.head_lr=1.0e-3",
                                   "full_ft:optimization.encoder_lr=5.0e-5"])
    prefix = grow_transfer.experiment(args, "bc5cdr", 100, 13, "prefix", "auto")
    full_ft = grow_transfer.experiment(args, "bc5cdr", 100, 13, "full_ft", None)
    assert prefix["optimization"] == {"max_steps": 400, "ema_decay": 0.98, "head_lr": 1.0e-3}
    assert prefix["prefix"] == {"transfer": "auto"}
    assert full_ft["optimization"] == {"max_steps": 400, "ema_decay": 0.98, "encoder_lr": 5.0e-5}


def test_set_with_an_unknown_method_is_refused_in_one_line():
    with pytest.raises(SystemExit, match="expected prefix:, lora: or full_ft:"):
        grow_transfer.method_settings(["lroa:optimization.lora_lr=1e-3"], "lora")


def test_a_finished_run_of_other_settings_is_refused_not_reported(tmp_path):
    (tmp_path / "experiment.yaml").write_text(yaml.safe_dump({"optimization": {"max_steps": 400}}))
    (tmp_path / "report.json").write_text("{}")
    assert grow_transfer.train({"optimization": {"max_steps": 400}}, tmp_path) == {}
    with pytest.raises(SystemExit, match="a run of other settings is already there"):
        grow_transfer.train({"optimization": {"max_steps": 400, "ema_decay": 0.98}}, tmp_path)


def test_a_bad_override_is_refused_in_one_line():
    args = argparse.Namespace(limit_eval=500, batch_size=32, steps=400, every=50, precision="auto", base="runs/base",
                              set=["optimization.max_steps.deeper=1"])
    with pytest.raises(SystemExit, match="cannot set a key inside 'optimization.max_steps'"):
        grow_transfer.experiment(args, "bc5cdr", 100, 13, "prefix", "auto")
