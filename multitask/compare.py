"""`multitask compare`: train P-Tuning v2 variants, LoRA, full fine-tuning and a linear probe on the same tasks.

Every method is a small strategy that rewrites the experiment config (method, prefix mode, task list); the
training loop, heads, batching, evaluation and reports are the same for all of them.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from multitask.config import from_dict, to_dict
from multitask.errors import ConfigError, MultitaskError
from multitask.experiment import ExperimentConfig
from multitask.registry import Registry
from multitask.reporting import load_report
from multitask.runtime import resolve_task_file
from multitask.utils.atomic import write_json, write_text

Strategy = Callable[[ExperimentConfig], list[tuple[str, ExperimentConfig]]]
METHODS: Registry[Strategy] = Registry("comparison method")


def _with(experiment: ExperimentConfig, method: str, mode: str | None = None) -> ExperimentConfig:
    prefix = experiment.prefix if mode is None else dataclasses.replace(experiment.prefix, mode=mode)
    return dataclasses.replace(experiment, method=method, prefix=prefix)


METHODS.register("prefix_shared", lambda e: [("prefix_shared", _with(e, "prefix", "shared"))])
METHODS.register("prefix_per_task", lambda e: [("prefix_per_task", _with(e, "prefix", "per_task"))])
def _single_task_runs(experiment: ExperimentConfig) -> list[tuple[str, ExperimentConfig]]:
    """One prefix model per task. A joint run's ``max_steps`` is split evenly, so each task gets as many of its
    own steps as round-robin joint training gives it and the total compute stays equal."""
    optimization = experiment.optimization
    if optimization.max_steps is not None:
        steps = max(1, optimization.max_steps // len(experiment.tasks))
        optimization = dataclasses.replace(optimization, max_steps=steps)
    base = dataclasses.replace(_with(experiment, "prefix", "per_task"), optimization=optimization)
    return [(f"prefix_single/{index}", dataclasses.replace(base, tasks=[entry]))
            for index, entry in enumerate(experiment.tasks)]


METHODS.register("prefix_single", _single_task_runs)
METHODS.register("lora", lambda e: [("lora", _with(e, "lora"))])
METHODS.register("full_ft", lambda e: [("full_ft", _with(e, "full_ft"))])
METHODS.register("linear_probe", lambda e: [("linear_probe", _with(e, "linear_probe"))])


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    if not methods:
        raise ConfigError(f"--methods: expected a comma-separated list of {', '.join(METHODS.available())}")
    for method in methods:
        METHODS.get(method)
    return methods


# Evaluations along a time budget: enough points for a learning curve, few enough to keep evaluation cheap.
CURVE_POINTS = 6


def with_budget(experiment: ExperimentConfig, minutes: float) -> ExperimentConfig:
    """The same experiment trained for ``minutes`` of training time instead of a step count, evaluated
    ``CURVE_POINTS`` times along the way (its learning curve against time)."""
    optimization = dataclasses.replace(experiment.optimization, max_minutes=minutes, max_steps=None, epochs=None)
    evaluation = dataclasses.replace(experiment.evaluation, every_steps=None, every_minutes=minutes / CURVE_POINTS)
    return dataclasses.replace(experiment, optimization=optimization, evaluation=evaluation)


def _split_budget(runs: list[tuple[str, ExperimentConfig]]) -> list[tuple[str, ExperimentConfig]]:
    """A method of several runs (prefix_single) shares one time budget: each run gets an equal part."""
    if len(runs) < 2 or runs[0][1].optimization.max_minutes is None:
        return runs
    return [(label, with_budget(experiment, experiment.optimization.max_minutes / len(runs)))
            for label, experiment in runs]


def method_experiment(base: ExperimentConfig, method: str, config_path: Path | None) -> list[tuple[str, ExperimentConfig]]:
    """The method's runs: its strategy applied, then its overrides from ``method_overrides``, task files absolute."""
    from multitask.tasks.loading import deep_merge

    resolved_tasks = [dataclasses.replace(t, file=str(resolve_task_file(t, config_path).resolve())) for t in base.tasks]
    base = dataclasses.replace(base, tasks=resolved_tasks)
    runs = []
    for label, experiment in METHODS.get(method)(base):
        overrides = base.method_overrides.get(method, {})
        data = deep_merge(to_dict(experiment), overrides)
        runs.append((label, from_dict(ExperimentConfig, data, source=f"method_overrides.{method}")))
    return _split_budget(runs)


def run_subprocess(experiment: ExperimentConfig, run_dir: Path) -> Path:
    """Train in a fresh process, so the peak memory its report records is its own."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file = run_dir / "experiment.yaml"
    write_text(config_file, yaml.safe_dump(to_dict(experiment), sort_keys=False, allow_unicode=True))
    command = [sys.executable, "-m", "multitask", "train", str(config_file), "--output-dir", str(run_dir),
               "--no-progress"]
    with open(run_dir / "stderr.log", "w", encoding="utf-8") as stderr:
        returncode = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=stderr).returncode
    if returncode != 0:
        raise MultitaskError(f"method run failed ({run_dir}); see {run_dir / 'stderr.log'}")
    return run_dir


def run_in_process(experiment: ExperimentConfig, run_dir: Path, encoder_factory=None, tokenizer=None) -> Path:
    """Train in this process (tests, or when subprocesses are unwanted); peak memory is then the process's."""
    from multitask.training.trainer import Trainer

    encoder = encoder_factory() if encoder_factory is not None else None
    Trainer(experiment, run_dir, encoder=encoder, tokenizer=tokenizer, progress=False).train()
    return run_dir


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def collect(run_dirs: list[Path], split: str) -> dict[str, Any]:
    """Per task: main metric, wall time, examples/s, peak memory, trainable parameters and checkpoint size."""
    tasks = {}
    for run_dir in run_dirs:
        report = load_report(run_dir / "report.json")
        meta = report.meta
        wall = float(meta.get("wall_time_s") or 0.0)
        minutes_at = {int(step): minutes for step, minutes in (meta.get("evaluation_minutes") or {}).items()}
        for name, task in report.tasks.items():
            result = task.splits.get(split)
            tasks[name] = {
                "main_metric": task.main_metric,
                "score": None if result is None else result.scores[task.main_metric],
                "curve": [[minutes_at[step], value] for step, s, value in task.metric_history
                          if s == split and step in minutes_at],
                "wall_time_s": wall,
                "train_time_s": meta.get("train_time_s"),
                "examples_per_s": (meta.get("train_examples_seen") or 0) / wall if wall else None,
                "peak_rss_bytes": meta.get("peak_rss_bytes"),
                "peak_gpu_memory_bytes": meta.get("peak_gpu_memory_bytes"),
                "trainable_parameters": meta.get("trainable_parameters"),
                "trainable_percent_of_encoder": 100.0 * meta["trainable_parameters"] / max(1, meta["encoder_parameters"]),
                "checkpoint_bytes": directory_bytes(run_dir / "checkpoint"),
                "run_dir": str(run_dir),
            }
    return tasks


def compare(
    experiment: ExperimentConfig, methods: list[str], output_dir: Path, config_path: Path | None = None,
    in_process: bool = False, encoder_factory=None, tokenizer=None, budget_minutes: float | None = None,
) -> dict[str, Any]:
    """Train every method and write comparison.json, comparison.md and comparison.png. With ``budget_minutes``
    every method gets the same training time (and a learning curve against it) instead of the same steps."""
    from multitask.reporting.comparison import render_comparison_markdown, render_comparison_plot

    if budget_minutes is not None:
        if budget_minutes <= 0:
            raise ConfigError(f"--budget-minutes must be > 0, got {budget_minutes}")
        experiment = with_budget(experiment, budget_minutes)
    split = experiment.evaluation.splits[0]
    results: dict[str, Any] = {"split": split, "experiment": experiment.name, "methods": {},
                               "budget_minutes": budget_minutes}
    started = time.perf_counter()
    for method in methods:
        run_dirs = []
        for label, method_config in method_experiment(experiment, method, config_path):
            run_dir = output_dir / "runs" / label
            if in_process:
                run_dirs.append(run_in_process(method_config, run_dir, encoder_factory, tokenizer))
            else:
                run_dirs.append(run_subprocess(method_config, run_dir))
        results["methods"][method] = {"tasks": collect(run_dirs, split)}
    results["peak_memory_per_method"] = not in_process
    results["wall_time_s"] = round(time.perf_counter() - started, 1)
    write_json(output_dir / "comparison.json", results)
    write_text(output_dir / "comparison.md", render_comparison_markdown(results))
    plot = render_comparison_plot(results)
    if plot is not None:
        (output_dir / "comparison.png").write_bytes(plot)
    return results
