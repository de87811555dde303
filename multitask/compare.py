"""`multitask compare`: train P-Tuning v2 variants, its ancestors (prompt tuning, P-Tuning v1, prefix tuning), LoRA,
full fine-tuning and a linear probe on the same tasks.

Every method is a small strategy that rewrites the experiment config (method, prefix mode, task list); the
training loop, heads, batching, evaluation and reports are the same for all of them.
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from multitask.checkpoint import checkpoint_dir, read_meta
from multitask.config import from_dict, to_dict
from multitask.errors import ConfigError, MultitaskError
from multitask.experiment import ExperimentConfig, TaskEntry
from multitask.registry import Registry
from multitask.reporting import load_report
from multitask.runtime import resolve_task_file
from multitask.training.grow import on_base_encoder, resolve_base_dir
from multitask.utils.atomic import write_json, write_text

log = logging.getLogger(__name__)
Strategy = Callable[[ExperimentConfig], list[tuple[str, ExperimentConfig]]]
METHODS: Registry[Strategy] = Registry("comparison method")


class MethodSkipped(MultitaskError):
    """A method this comparison cannot train, found out only from an earlier method's run: its row says why."""


def _with(experiment: ExperimentConfig, method: str, mode: str | None = None) -> ExperimentConfig:
    """The experiment under another method (and prefix mode), trained from scratch (the pretrained encoder, no
    base): only prefix_transfer grows the experiment's base run, only full_ft_intermediate starts another encoder."""
    prefix = experiment.prefix if mode is None else dataclasses.replace(experiment.prefix, mode=mode)
    encoder = dataclasses.replace(experiment.encoder, init_from=None)
    return dataclasses.replace(experiment, method=method, prefix=prefix, encoder=encoder, base=None)


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
# A stage's init_from naming "@<label>" is the run directory of that earlier run of the same comparison.
EARLIER_RUN = "@"


def _top_k(experiment: ExperimentConfig, k: int) -> ExperimentConfig:
    """Task prefixes in the top k layers only, the frozen layers below them computed once (frozen-layer cache)."""
    prefix = dataclasses.replace(experiment.prefix, mode="per_task",
                                 prefix=dataclasses.replace(experiment.prefix.prefix, layers={"top": k}))
    cache = dataclasses.replace(experiment.optimization.frozen_cache, enabled=True)
    optimization = dataclasses.replace(experiment.optimization, frozen_cache=cache)
    return dataclasses.replace(experiment, method="prefix", prefix=prefix, optimization=optimization, base=None)


def _shared_then_top_k(experiment: ExperimentConfig, k: int, method: str) -> list[tuple[str, ExperimentConfig]]:
    """Stage 1: one shared all-layer prefix trained on every task jointly; stage 2: that prefix frozen, task
    prefixes in the top k layers on top of it (the frozen layers below cached). A budget is split between them."""
    stage1 = _with(experiment, "prefix", "shared")
    stage2 = _top_k(experiment, k)
    shared_length = experiment.prefix.prefix.length
    stage2 = dataclasses.replace(stage2, prefix=dataclasses.replace(
        stage2.prefix, mode="hybrid", shared_layers="all", shared_length=shared_length,
        init_from=f"{EARLIER_RUN}{method}/stage1", freeze=["shared"]))
    return [(f"{method}/stage1", stage1), (f"{method}/stage2", stage2)]


for _k in (1, 2, 3):
    METHODS.register(f"prefix_top{_k}", lambda e, k=_k: [(f"prefix_top{k}", _top_k(e, k))])
    METHODS.register(f"prefix_shared_then_top{_k}",
                     lambda e, k=_k: _shared_then_top_k(e, k, f"prefix_shared_then_top{k}"))
def _transfer(experiment: ExperimentConfig) -> list[tuple[str, ExperimentConfig]]:
    """Grow the experiment's ``base`` run by its tasks, each new prefix started from the base's prefixes (auto,
    unless the experiment names a source): the other methods train the same tasks without the base."""
    if experiment.base is None:
        raise ConfigError("method prefix_transfer grows a trained run: set base: <run dir> in the experiment")
    transfer = experiment.prefix.transfer if experiment.prefix.transfer != "none" else "auto"
    return [("prefix_transfer", dataclasses.replace(_with(experiment, "prefix"), base=experiment.base, prefix=(
        dataclasses.replace(experiment.prefix, mode="per_task", transfer=transfer))))]


METHODS.register("prefix_transfer", _transfer)

# full_ft_intermediate's stage 1 trains base tasks, named in its task entries as BASE_TASK + "<base run>#<task>",
# or "#" + AUTO_CHOICE: the base tasks whose prefixes prefix_transfer's auto chose in this comparison. compare writes
# their definitions, as the base saved them, beside stage 1's run just before it trains.
INTERMEDIATE = "full_ft_intermediate"
BASE_TASK = "base-task:"
AUTO_CHOICE = EARLIER_RUN + "prefix_transfer"


def _closest_task(experiment: ExperimentConfig, base_tasks: list[str]) -> str:
    """The base task whose prefix prefix.transfer names (task_<name>), or AUTO_CHOICE for auto (and for none, which
    prefix_transfer runs as auto)."""
    transfer = experiment.prefix.transfer
    if transfer in ("auto", "none"):
        return AUTO_CHOICE
    task = transfer.removeprefix("task_")
    if transfer.startswith("task_") and task in base_tasks:
        return task
    raise ConfigError(f"method {INTERMEDIATE}: prefix.transfer {transfer!r} names no task of base {experiment.base} "
                      f"(its tasks: {', '.join(base_tasks)}); name the closest one as task_<name>, or set auto and "
                      f"list prefix_transfer before {INTERMEDIATE} to take its choice")


def _full_ft_intermediate(experiment: ExperimentConfig) -> list[tuple[str, ExperimentConfig]]:
    """STILTs, the classic strong baseline beside a grown model: full fine-tuning on the base's closest task
    (stage 1), then on the experiment's own tasks from that fine-tuned encoder, with fresh heads (stage 2). Both
    stages run on the base's encoder and share a time budget."""
    if experiment.base is None:
        raise ConfigError(f"method {INTERMEDIATE} fine-tunes on the base's closest task first: set base: <run dir> "
                          f"in the experiment")
    meta = read_meta(checkpoint_dir(Path(experiment.base)))
    task = _closest_task(experiment, [saved["config"]["name"] for saved in meta["tasks"]])
    encoder = on_base_encoder(dataclasses.replace(experiment, method="prefix"), None).encoder
    scratch = dataclasses.replace(_with(experiment, "full_ft"), encoder=encoder)
    stage1 = dataclasses.replace(scratch, tasks=[TaskEntry(file=f"{BASE_TASK}{experiment.base}#{task}")])
    stage2 = dataclasses.replace(scratch, encoder=dataclasses.replace(
        encoder, init_from=f"{EARLIER_RUN}{INTERMEDIATE}/stage1"))
    return [(f"{INTERMEDIATE}/stage1", stage1), (INTERMEDIATE, stage2)]


METHODS.register("full_ft_intermediate", _full_ft_intermediate)


# P-Tuning v2's ancestors, so the lineage can be compared on the user's own tasks (docs/compare.md).
def _input_prompts(experiment: ExperimentConfig, label: str, encoder: str) -> list[tuple[str, ExperimentConfig]]:
    """Soft tokens at the input only: trained directly (prompt tuning) or from a prompt encoder (P-Tuning v1)."""
    prompt = dataclasses.replace(experiment.prompt, encoder=encoder)
    return [(label, dataclasses.replace(_with(experiment, "prompt"), prompt=prompt))]


# The MLP's learning rate: at the flat prefixes' 2e-2 (or 2e-3) the MLP diverged to chance on SST-2; 5e-4 learned
# (docs/compare.md, "The lineage"). method_overrides.prefix_tuning.optimization.prefix_lr sets another.
PREFIX_TUNING_LR = 5e-4


def _prefix_tuning(experiment: ExperimentConfig) -> list[tuple[str, ExperimentConfig]]:
    """Li & Liang's prefix tuning: a prefix in every layer, produced by an MLP over a prefix embedding and started
    from real words' activations, in one softmax with the real tokens; saved folded to flat keys/values."""
    settings = dataclasses.replace(experiment.prefix.prefix, reparameterize=True, layers="all", init="vocab")
    prefix = dataclasses.replace(experiment.prefix, mode="per_task", prefix=settings, attention="joint")
    optimization = dataclasses.replace(experiment.optimization, prefix_lr=PREFIX_TUNING_LR)
    return [("prefix_tuning", dataclasses.replace(_with(experiment, "prefix"), prefix=prefix,
                                                  optimization=optimization))]


METHODS.register("prompt_tuning", lambda e: _input_prompts(e, "prompt_tuning", "none"))
METHODS.register("p_tuning_v1", lambda e: _input_prompts(e, "p_tuning_v1", "lstm"))
METHODS.register("prefix_tuning", _prefix_tuning)
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
    grown = str(resolve_base_dir(base.base, config_path).resolve()) if base.base else None
    base = dataclasses.replace(base, tasks=resolved_tasks, base=grown)
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
    """Train in this process (tests, or when subprocesses are unwanted); peak RSS is then the process's, while the
    GPU's peak is counted afresh for each method."""
    import torch

    from multitask.training.trainer import Trainer

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()  # the current device's: the one a single-process run trains on
    encoder = encoder_factory() if encoder_factory is not None else None
    Trainer(experiment, run_dir, encoder=encoder, tokenizer=tokenizer, progress=False).train()
    return run_dir


def _earlier_runs(experiment: ExperimentConfig) -> list[tuple[str, str]]:
    """(what, label) of each run of this comparison that ``experiment`` starts from or takes its tasks from."""
    sources = [("prefix.init_from", experiment.prefix.init_from), ("encoder.init_from", experiment.encoder.init_from),
               *(("task", entry.file.rpartition("#")[2]) for entry in experiment.tasks
                 if entry.file.startswith(BASE_TASK))]
    return [(what, source[len(EARLIER_RUN):]) for what, source in sources if source and source.startswith(EARLIER_RUN)]


def _check_order(plans: list[tuple[str, list[tuple[str, ExperimentConfig]]]]) -> None:
    """Every run a stage starts from, or takes its task from, trains before it: refused before anything trains."""
    trained: set[str] = set()
    for method, runs in plans:
        for label, experiment in runs:
            for what, source in _earlier_runs(experiment):
                if source in trained:
                    continue
                if what == "task":
                    raise ConfigError(f"method {method}: prefix.transfer is auto, so its intermediate task is the base "
                                      f"task that {source}'s auto chooses: list {source} before {method} in "
                                      f"--methods, or name the task (prefix.transfer: task_<name>)")
                raise ConfigError(f"method {method}: run {label}'s {what} is run {source}, which this comparison "
                                  f"does not train before it")
            trained.add(label)


def _in_this_comparison(source: str | None, output_dir: Path) -> str | None:
    if not source or not source.startswith(EARLIER_RUN):
        return source
    return str(output_dir / "runs" / source[len(EARLIER_RUN):])


def _resolve_earlier_run(experiment: ExperimentConfig, output_dir: Path) -> ExperimentConfig:
    """Sources named "@<label>" as the run directories of this comparison's earlier runs."""
    prefix = dataclasses.replace(experiment.prefix, init_from=_in_this_comparison(experiment.prefix.init_from,
                                                                                  output_dir))
    encoder = dataclasses.replace(experiment.encoder, init_from=_in_this_comparison(experiment.encoder.init_from,
                                                                                    output_dir))
    return dataclasses.replace(experiment, prefix=prefix, encoder=encoder)


def _auto_choices(transfer_run: Path, base_tasks: list[str]) -> list[str]:
    """The base tasks whose prefixes prefix_transfer's auto chose for the experiment's tasks (meta.transfer)."""
    choices = load_report(transfer_run / "report.json").meta.get("transfer") or {}
    sources = [choice["source"] for choice in choices.values()]
    tasks = [source.removeprefix("task_") for source in sources if source.startswith("task_")]
    chosen = list(dict.fromkeys(task for task in tasks if task in base_tasks))
    if chosen:
        return chosen
    if all(source == "none" for source in sources):
        raise MethodSkipped(f"prefix_transfer's auto found no base task closer than a fresh start (source none); "
                            f"name one with prefix.transfer: task_<name> to train {INTERMEDIATE}")
    raise MethodSkipped(f"prefix_transfer's auto chose {', '.join(sorted(set(sources)))}, no base task's own "
                        f"prefix; name the closest task with prefix.transfer: task_<name>")


def _resolve_base_tasks(experiment: ExperimentConfig, output_dir: Path, run_dir: Path) -> ExperimentConfig:
    """Base-task entries as task files written into ``run_dir``: each task as its base saved it, its data read
    from the experiment's data_root."""
    entries = []
    for entry in experiment.tasks:
        if not entry.file.startswith(BASE_TASK):
            entries.append(entry)
            continue
        base, _, named = entry.file[len(BASE_TASK):].rpartition("#")
        saved = {task["config"]["name"]: task["config"] for task in read_meta(checkpoint_dir(Path(base)))["tasks"]}
        names = _auto_choices(output_dir / "runs" / AUTO_CHOICE[len(EARLIER_RUN):], list(saved)) \
            if named == AUTO_CHOICE else [named]
        for name in names:
            path = run_dir / f"base_task_{name}.yaml"
            run_dir.mkdir(parents=True, exist_ok=True)
            write_text(path, yaml.safe_dump(saved[name], sort_keys=False, allow_unicode=True))
            entries.append(dataclasses.replace(entry, file=str(path)))
    return dataclasses.replace(experiment, tasks=entries)


def train_run(label: str, experiment: ExperimentConfig, output_dir: Path, in_process: bool, encoder_factory=None,
              tokenizer=None) -> Path:
    """Train one run of a method into runs/<label>, its sources in this comparison resolved first."""
    run_dir = output_dir / "runs" / label
    experiment = _resolve_base_tasks(_resolve_earlier_run(experiment, output_dir), output_dir, run_dir)
    if in_process:
        return run_in_process(experiment, run_dir, encoder_factory, tokenizer)
    return run_subprocess(experiment, run_dir)


def _is_staged(run_dirs: list[Path]) -> bool:
    return len(run_dirs) > 1 and run_dirs[0].name.startswith("stage")


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def collect(run_dirs: list[Path], split: str, staged: bool = False) -> dict[str, Any]:
    """Per task: main metric, wall time, examples/s, step time, peak memory, trainable parameters, frozen-cache size
    and checkpoint size. ``staged``: the runs are stages of one method (each starting from the one before), so a
    later stage's times count on from the earlier stages' and its results replace theirs."""
    tasks = {}
    earlier_train_minutes, earlier_wall = 0.0, 0.0
    report = None
    for run_dir in run_dirs:
        report = load_report(run_dir / "report.json")
        meta = report.meta
        wall = float(meta.get("wall_time_s") or 0.0) + earlier_wall
        minutes_at = {int(step): minutes + earlier_train_minutes
                      for step, minutes in (meta.get("evaluation_minutes") or {}).items()}
        steps = meta.get("steps") or 0
        cache = meta.get("frozen_cache") or {}
        for name, task in report.tasks.items():
            result = task.splits.get(split)
            before = tasks[name]["curve"] if staged and name in tasks else []
            tasks[name] = {
                "main_metric": task.main_metric,
                "score": None if result is None else result.scores[task.main_metric],
                "curve": before + [[minutes_at[step], value] for step, s, value in task.metric_history
                                   if s == split and step in minutes_at],
                "wall_time_s": wall,
                "train_time_s": (meta.get("train_time_s") or 0.0) + 60.0 * earlier_train_minutes,
                "step_time_s": (meta.get("train_time_s") or 0.0) / steps if steps else None,
                "frozen_cache_bytes": cache.get("stored_bytes"),
                "examples_per_s": (meta.get("train_examples_seen") or 0) / wall if wall else None,
                "peak_rss_bytes": meta.get("peak_rss_bytes"),
                "peak_gpu_memory_bytes": meta.get("peak_gpu_memory_bytes"),
                "trainable_parameters": meta.get("trainable_parameters"),
                "trainable_percent_of_encoder": 100.0 * meta["trainable_parameters"] / max(1, meta["encoder_parameters"]),
                "checkpoint_bytes": directory_bytes(run_dir / "checkpoint"),
                "run_dir": str(run_dir),
            }
        if staged:
            earlier_train_minutes += (meta.get("train_time_s") or 0.0) / 60.0
            earlier_wall = wall
    if staged and report is not None:  # an earlier stage's own tasks (an intermediate task) are not the results
        tasks = {name: cell for name, cell in tasks.items() if name in report.tasks}
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
    plans = [(method, method_experiment(experiment, method, config_path)) for method in methods]
    _check_order(plans)
    for method, runs in plans:
        try:
            run_dirs = [train_run(label, method_config, output_dir, in_process, encoder_factory, tokenizer)
                        for label, method_config in runs]
        except MethodSkipped as skipped:
            log.warning("method %s not trained: %s", method, skipped)
            results["methods"][method] = {"tasks": {}, "skipped": str(skipped)}
            continue
        results["methods"][method] = {"tasks": collect(run_dirs, split, staged=_is_staged(run_dirs))}
    results["peak_memory_per_method"] = not in_process
    results["wall_time_s"] = round(time.perf_counter() - started, 1)
    write_json(output_dir / "comparison.json", results)
    write_text(output_dir / "comparison.md", render_comparison_markdown(results))
    plot = render_comparison_plot(results)
    if plot is not None:
        (output_dir / "comparison.png").write_bytes(plot)
    return results
