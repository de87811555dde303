"""Grow a trained model task by task: new tasks train alone on its frozen encoder and frozen prefixes.

Real tasks arrive one at a time, with little data. Retraining every task jointly changes the tasks a model already
serves, and a new task trained from a random prefix ignores what the model's prefixes already know (DESIGN.md §6:
starting a 100-example NER task from the model's CoNLL-2003 prefix is worth about +9 F1). So a grown run:

- keeps the base's prefixes and heads as they are (loaded from its checkpoint, frozen, saved again bit for bit),
  so every base task predicts exactly what the base run predicts;
- gives each new task a prefix of its own (after the base's ``shared`` prefix, frozen, when the base has one) and a
  head, and trains only those;
- starts each new prefix as ``prefix.transfer`` says: as a fresh prefix, from a named base prefix, or from the base
  prefix that ``auto`` measures best on the task's own training data (:mod:`multitask.training.prefix_transfer`).

The run it writes is self-contained: its checkpoint holds every task of the base and the new ones.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from multitask.backbone import encoder_shape
from multitask.checkpoint import checkpoint_dir, read_checkpoint, read_meta, write_checkpoint
from multitask.config import from_dict
from multitask.errors import CheckpointError, ConfigError
from multitask.experiment import ExperimentConfig
from multitask.inference.loading import LoadedCheckpoint, load_checkpoint_model
from multitask.model import MultiTaskModel
from multitask.prefix.bank import SHARED, PrefixLayout, plan_layout
from multitask.prefix.config import resolve_layers
from multitask.runtime import TaskRuntime, build_heads, prefix_requests
from multitask.tasks.base import TaskType
from multitask.training.prefix_transfer import (
    TrialPlan, mean_mixing_weights, score_starts, source_key_values, start_prefix,
)
from multitask.tuning import TaskTuning
from multitask.utils.atomic import ensure_writable

log = logging.getLogger(__name__)


@dataclass
class BaseRun:
    """The trained run a grown run starts from: its checkpoint's meta and its model (frozen, on the CPU)."""

    run_dir: Path
    meta: dict[str, Any]
    loaded: LoadedCheckpoint

    @property
    def task_names(self) -> list[str]:
        return list(self.loaded.tasks)

    @property
    def prefix_names(self) -> list[str]:
        bank = self.loaded.model.prefix_bank
        return [name for name, encoder in bank.encoders.items() if encoder.length] if bank is not None else []

    def prefixes_of_type(self, task_type: str) -> list[str]:
        """The base prefixes that serve only tasks of ``task_type``: a task's own prefix, a group's whose tasks are
        all of that type, the shared prefix only when every base task is."""
        bank = self.loaded.model.prefix_bank
        served: dict[str, set[str]] = {}
        for task, prefixes in (bank.layout.task_prefixes.items() if bank is not None else ()):
            for prefix in prefixes:
                served.setdefault(prefix, set()).add(self.loaded.tasks[task].config.type)
        return [name for name in self.prefix_names if served.get(name) == {task_type}]

    def identity(self) -> dict[str, Any]:
        """What a grown run records of its base: where it was, which checkpoint (by checksum), its tasks."""
        return {"path": str(self.run_dir), "checkpoint_sha256": self.meta.get("model_sha256"),
                "tasks": self.task_names}


def resolve_base_dir(base: str, config_path: Path | None) -> Path:
    """``base`` from the working directory, else beside the experiment config."""
    candidates = [Path(base)] + ([config_path.parent / base] if config_path is not None else [])
    for candidate in candidates:
        if (candidate / "checkpoint").exists() or (candidate / ".checkpoint.old").exists():
            return candidate
    raise ConfigError(f"{config_path or '<config>'}: base: no trained run at {base!r} (looked for "
                      f"{', '.join(str(c / 'checkpoint') for c in candidates)})")


def on_base_encoder(experiment: ExperimentConfig, config_path: Path | None) -> ExperimentConfig:
    """A growing experiment checked against its base, with the base's encoder settings (a grown run uses its base's
    encoder and tokenizer, whatever the experiment's encoder section says when left at its default)."""
    source = f"{config_path or '<config>'}"
    run_dir = resolve_base_dir(experiment.base, config_path)
    if experiment.method != "prefix":
        raise ConfigError(f"{source}: base: growing trains prefixes; method must be prefix, not {experiment.method}")
    if experiment.prefix.init_from:
        raise ConfigError(f"{source}: base and prefix.init_from exclude each other; a grown run starts from its "
                          f"base (prefix.transfer says how)")
    meta = read_meta(checkpoint_dir(run_dir))
    if meta["method"] != "prefix":
        raise ConfigError(f"{source}: base {run_dir} was trained with method {meta['method']}; only a prefix run can "
                          f"grow (its encoder must stay frozen and shared)")
    default_encoder = type(experiment.encoder)().name
    if experiment.encoder.name not in (default_encoder, meta["encoder"]["name"]):
        raise ConfigError(f"{source}: encoder.name {experiment.encoder.name!r} differs from the base's "
                          f"{meta['encoder']['name']!r}; a grown run uses its base's encoder (leave encoder out)")
    base_encoder = from_dict(type(experiment.encoder), meta["experiment"]["encoder"],
                             source=str(checkpoint_dir(run_dir) / "meta.json"), path="experiment.encoder")
    return replace(experiment, encoder=base_encoder)


def load_base(experiment: ExperimentConfig, config_path: Path | None, encoder=None) -> BaseRun:
    """The base run of a growing experiment (checked by :func:`on_base_encoder`), its model loaded on ``encoder``
    (default: the base's own)."""
    run_dir = resolve_base_dir(experiment.base, config_path)
    meta, _ = read_checkpoint(run_dir)
    loaded = load_checkpoint_model(run_dir, encoder)
    log.info("growing %s (%s): tasks %s, prefixes %s", run_dir, checkpoint_dir(run_dir) / "model.safetensors",
             ", ".join(loaded.tasks), ", ".join(loaded.model.prefix_bank.encoders))
    return BaseRun(run_dir, meta, loaded)


def check_new_tasks(base: BaseRun, tasks: list[TaskType], source: str) -> None:
    """A new task may not take a base task's name: the base's tasks stay exactly as they are."""
    for task in tasks:
        if task.config.name in base.loaded.tasks:
            raise ConfigError(f"{source}: task {task.config.name!r} is already in base {base.run_dir}; a grown run "
                              f"keeps the base's tasks as they are: rename the new task (its YAML's name) or "
                              f"remove it from the base first (multitask remove)")


def grown_layout(base: PrefixLayout, new: PrefixLayout) -> PrefixLayout:
    """The base's prefixes and tasks, then the new tasks, each with its own prefix after the base's shared one
    (when the base has one: what every base task already attends to is part of the model a new task joins)."""
    shared = (SHARED,) if SHARED in base.prefixes else ()
    return PrefixLayout(
        prefixes={**base.prefixes, **new.prefixes},
        task_prefixes={**base.task_prefixes, **{task: shared + names for task, names in new.task_prefixes.items()}},
        attention={**base.attention, **new.attention},
        mixtures={**base.mixtures, **new.mixtures},
    )


def new_prefix_name(task: str) -> str:
    return f"task_{task}"


def build_grown_model(base: BaseRun, experiment: ExperimentConfig, tasks: list[TaskType],
                      tunings: dict[str, TaskTuning]) -> MultiTaskModel:
    """The base's model with a new prefix and head per new task; the base's own prefixes and heads are the very
    modules loaded from its checkpoint, frozen."""
    base_model = base.loaded.model
    base_layout = base_model.prefix_bank.layout
    new_layout = plan_layout(replace(experiment.prefix, mode="per_task"), prefix_requests(tasks, tunings))
    for name in new_layout.prefixes:
        if name in base_layout.prefixes:
            raise ConfigError(f"prefix {name!r} is already in base {base.run_dir}: rename the new task")
    encoder = base_model.encoder
    sources = _mixture_sources(base, experiment, tasks, new_layout, encoder_shape(encoder.config).num_layers)
    heads = {**dict(base_model.heads.items()),
             **build_heads(tasks, encoder_shape(encoder.config).hidden_size)}
    layout = grown_layout(base_layout, new_layout)
    model = MultiTaskModel(encoder, heads, replace(layout, mixtures={**layout.mixtures,
                                                                     **{n: tuple(s) for n, s in sources.items()}}))
    for name, fitted in sources.items():
        model.prefix_bank.mixtures[name].source_kv.copy_(torch.stack(list(fitted.values())))
    bank, base_bank = model.prefix_bank, base_model.prefix_bank
    for name in base_layout.prefixes:
        bank.encoders[name] = base_bank.encoders[name].requires_grad_(False)
    for name in base_layout.mixtures:
        bank.mixtures[name] = base_bank.mixtures[name].requires_grad_(False)
    for name in base.task_names:
        model.heads[name].requires_grad_(False)
    return model


def check_base_unchanged(base: BaseRun, saved: dict[str, Any] | None, run_dir: Path) -> None:
    """A resumed grown run continues on the very base it started from (its frozen half is read from there)."""
    started_on = (saved or {}).get("base_checkpoint_sha256")
    now = base.meta.get("model_sha256")
    if started_on is not None and started_on != now:
        raise CheckpointError(f"{run_dir}: its base {base.run_dir} changed since the run started "
                              f"(checkpoint checksum {now}, was {started_on}); start the run afresh")


def transfer_setting(experiment: ExperimentConfig, task: TaskType) -> str:
    """How a new task's prefix starts: its task file's prefix.transfer, else the experiment's."""
    return task.config.prefix.transfer or experiment.prefix.transfer


def _mixture_sources(base: BaseRun, experiment: ExperimentConfig, tasks: list[TaskType], new_layout: PrefixLayout,
                     num_layers: int) -> dict[str, dict[str, torch.Tensor]]:
    """For each new prefix started as a mixture: every base prefix that fits it, its keys/values fitted."""
    mixtures = {}
    bank = base.loaded.model.prefix_bank
    for task in tasks:
        if transfer_setting(experiment, task) != "mixture":
            continue
        name = new_prefix_name(task.config.name)
        config = new_layout.prefixes[name]
        layers = resolve_layers(config.layers, num_layers)
        fitted = {}
        for source in base.prefix_names:
            try:  # a source adds nothing in the layers it lacks
                zeros = torch.zeros(len(layers), 2, *bank.encoders[source].kv_shape[2:3], config.length,
                                    bank.encoders[source].head_dim)
                fitted[source] = source_key_values(bank.encoders[source], layers, config.length, source, zeros)
            except ConfigError as error:
                log.info("mixture for %s: source %s left out: %s", task.config.name, source, error)
        if not fitted:
            raise ConfigError(f"task {task.config.name}: prefix.transfer mixture: no prefix of base {base.run_dir} "
                              f"fits a {config.length}-token prefix in layers {list(layers)}")
        log.info("mixture for %s: sources %s", task.config.name, ", ".join(fitted))
        mixtures[name] = fitted
    return mixtures


def grown_tasks_meta(base: BaseRun, new_tasks_meta: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The checkpoint's task list: the base's entries as saved (so they load back as they were), then the new."""
    return [*base.meta["tasks"], *new_tasks_meta]


def task_rows(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per task of a saved model: name, type, labels, prefixes (with their attention) and origin."""
    layout = meta.get("prefix_layout", {})
    attention = layout.get("attention", {})
    from_base = set(meta.get("base", {}).get("tasks", []))
    rows = []
    for saved in meta["tasks"]:
        name = saved["config"]["name"]
        prefixes = layout.get("task_prefixes", {}).get(name, [])
        rows.append({
            "task": name, "type": saved["config"]["type"], "labels": len(saved["labels"]),
            "prefixes": [f"{p} ({attention.get(p, 'joint') if isinstance(attention, dict) else attention}, "
                         f"{layout['prefixes'][p].get('length')} tokens)" for p in prefixes],
            "origin": f"base {meta['base']['path']}" if name in from_base else "trained here",
        })
    return rows


def remove_task(run_dir: Path, task: str, output_dir: Path) -> Path:
    """Write the model of ``run_dir`` without ``task`` to ``output_dir``: its head, and the prefixes no other task
    attends to, are left out; every other weight is copied unchanged, so every other task predicts exactly as it
    did. The source run is never modified."""
    meta, weights = read_checkpoint(run_dir)
    names = [saved["config"]["name"] for saved in meta["tasks"]]
    if task not in names:
        raise ConfigError(f"{run_dir}: no task {task!r}; its tasks: {', '.join(names)}")
    if len(names) == 1:
        raise ConfigError(f"{run_dir}: {task!r} is its only task; a model without tasks has nothing to serve")
    if Path(output_dir).resolve() == Path(run_dir).resolve() or (Path(output_dir) / "checkpoint").exists():
        raise ConfigError(f"{output_dir}: already holds a run (or is the source); choose a new --output-dir")
    layout = meta["prefix_layout"]
    task_prefixes = {t: p for t, p in layout["task_prefixes"].items() if t != task}
    kept = {name for prefixes in task_prefixes.values() for name in prefixes}
    dropped = [name for name in layout["prefixes"] if layout["task_prefixes"] and name not in kept]
    attention = layout.get("attention")
    new_layout = {**layout, "task_prefixes": task_prefixes,
                  "prefixes": {n: c for n, c in layout["prefixes"].items() if n not in dropped}}
    if isinstance(attention, dict):
        new_layout["attention"] = {n: a for n, a in attention.items() if n not in dropped}
    state = {key: value for key, value in weights.items()
             if not key.startswith(f"heads.{task}.") and not any(key.startswith(f"prefix_bank.encoders.{n}.")
                                                                   for n in dropped)}
    new_meta = {key: value for key, value in meta.items() if key not in ("model_sha256", "format_version")}
    new_meta.update(tasks=[s for s in meta["tasks"] if s["config"]["name"] != task], prefix_layout=new_layout,
                    removed={"task": task, "from": str(run_dir), "prefixes": dropped})
    if "base" in meta:
        new_meta["base"] = {**meta["base"], "tasks": [t for t in meta["base"]["tasks"] if t != task]}
    ensure_writable(output_dir)
    written = write_checkpoint(Path(output_dir), state, new_meta)
    log.info("wrote %s without task %s (prefixes left out: %s)", written, task, ", ".join(dropped) or "none")
    return written


def start_head_from_base(model: MultiTaskModel, base: BaseRun, task: TaskType) -> str | None:
    """Copy the base head that ``head.transfer_from`` names into the new task's head; the base task's name, or None.
    Refused in one line unless both tasks have the same type, labels and head shape."""
    source = task.config.head.transfer_from
    if source is None:
        return None
    name = task.config.name
    if source not in base.loaded.tasks:
        raise ConfigError(f"task {name}: head.transfer_from {source!r}: no such task in base {base.run_dir}; its "
                          f"tasks: {', '.join(base.task_names)}")
    theirs = base.loaded.tasks[source]
    if theirs.config.type != task.config.type or list(theirs.labels) != list(task.labels):
        raise ConfigError(f"task {name}: head.transfer_from {source!r}: that head is a {theirs.config.type} head "
                          f"over labels {theirs.labels}, this task is {task.config.type} over {task.labels}; a head "
                          f"starts from another only with the same type and labels")
    state = base.loaded.model.heads[source].state_dict()
    ours = model.heads[name].state_dict()
    if state.keys() != ours.keys() or any(state[k].shape != ours[k].shape for k in state):
        raise ConfigError(f"task {name}: head.transfer_from {source!r}: the heads differ in shape (head settings "
                          f"such as hidden_size or pooling); give both the same head settings")
    model.heads[name].load_state_dict(state)
    log.info("head %s starts from base head %s", name, source)
    return source


def start_new_prefixes(model: MultiTaskModel, base: BaseRun, experiment: ExperimentConfig, tasks: list[TaskRuntime],
                       tunings: dict[str, TaskTuning], tokenizer, device: torch.device, precision: str, pad_id: int,
                       ) -> dict[str, dict[str, Any]]:
    """Each new task's prefix starts as prefix.transfer says (the task file's setting first), and its head from
    a base head where head.transfer_from names one (after auto's scoring, which starts every candidate from
    the same head). Returns how each started, by task."""
    choices = {}
    settings = experiment.prefix
    plan = TrialPlan(settings.transfer_steps, settings.transfer_folds, settings.transfer_criterion,
                     settings.transfer_prior)
    for runtime in tasks:
        setting = transfer_setting(experiment, runtime.task)
        tuning = tunings[runtime.name]

        def scorer(starts, runtime=runtime, tuning=tuning):
            return score_starts(model, runtime, new_prefix_name(runtime.name), starts,
                                (tuning.prefix_lr, tuning.head_lr), plan, tokenizer, device, precision, pad_id,
                                experiment.seed)

        choice = start_prefix(model, runtime, new_prefix_name(runtime.name), setting, base.prefix_names, plan, scorer,
                              base.prefixes_of_type(runtime.task.config.type))
        choices[runtime.name] = {**choice.describe(), "head_from": start_head_from_base(model, base, runtime.task)}
    return choices


def transfer_report(model: MultiTaskModel, tasks: list[TaskRuntime], transfers: dict[str, dict[str, Any]],
                    splits: list[str], pad_id: int, device: torch.device) -> dict[str, dict[str, Any]]:
    """How each new prefix started; for a mixture, its mean weight on each source over the evaluated split."""
    report = {name: dict(choice) for name, choice in transfers.items()}
    mixtures = model.prefix_bank.layout.mixtures
    for runtime in tasks:
        name = new_prefix_name(runtime.name)
        split = next((s for s in splits if s in runtime.features), "train")
        if name in mixtures and runtime.name in report:
            report[runtime.name]["mixing_weights"] = {
                "split": split, "mean": mean_mixing_weights(model, runtime, name, split, pad_id, device)}
    return report
