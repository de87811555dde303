"""The tasks one server holds at one moment, their public names, and the model pass the batcher calls.

A catalog is a snapshot: every task of every run in it sits in one merged model (:mod:`multitask.serve.merge`), so
any mix of tasks and runs takes one encoder pass. A server whose runs change builds a new catalog per change
(:mod:`multitask.serve.fleet`); each parsed input keeps the catalog it was parsed against until it is answered.

Names: every task is ``run/task``; a server of one run (and no store) names its tasks plainly (``cls``), and
``run/task`` is accepted there too.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from multitask.backbone import is_legacy_fingerprint
from multitask.checkpoint import checkpoint_dir, read_meta
from multitask.config import from_dict
from multitask.errors import ConfigError
from multitask.inference import InferenceEngine
from multitask.run import TrainedRun
from multitask.serve.merge import merged_engine, qualified
from multitask.tasks.base import TaskType
from multitask.tasks.config import TaskConfig

# Methods whose runs cannot share one model pass with other runs, and why: their checkpoint changes the encoder
# itself, or puts soft tokens in front of every input (positions the other runs' inputs do not have).
SOLO_METHODS = {
    "full_ft": "changes the encoder",
    "lora": "changes the encoder",
    "prompt": "puts soft prompt tokens in front of its inputs, which other runs' inputs cannot share a batch with",
}


def solo_reason(method: str) -> str | None:
    """Why a run of ``method`` must be served alone (None: it can share the served encoder and its passes)."""
    return SOLO_METHODS.get(method)


class UnknownTask(ConfigError):
    """A request names a task this server does not serve (answered 404)."""


@dataclass(frozen=True, eq=False)
class ServedTask:
    name: str  # the public name
    run_name: str
    run: TrainedRun
    task_name: str  # its name inside the run

    @property
    def key(self) -> str:
        """Its name in the merged model: ``run/task``."""
        return qualified(self.run_name, self.task_name)

    @property
    def task(self) -> TaskType:
        return self.run.tasks[self.task_name]

    @property
    def takes_text(self) -> bool:
        """Whether a plain text is a whole input (QA needs a question and a context)."""
        return self.task.accepts_plain_text

    def describe(self) -> dict[str, Any]:
        task = self.task
        return {"name": self.name, "run": self.run_name, "task": self.task_name, "type": task.config.type,
                "labels": list(task.labels), "label_names": task.config.label_names,
                "input_schema": type(task).input_schema}


@dataclass(frozen=True, eq=False)
class Item:
    """One parsed input bound to its task and to the catalog it was parsed against: what the batcher queues."""

    task: ServedTask
    example: Any
    catalog: "Catalog"
    features: tuple | None = None  # its windows, when the parsing thread has featurized it already


class Catalog:
    """Served tasks by public name over one merged model; ``predict`` is the batcher's model pass."""

    def __init__(self, tasks: list[ServedTask], engine: InferenceEngine | None = None) -> None:
        self.tasks = {task.name: task for task in tasks}
        if len(self.tasks) != len(tasks):
            raise ConfigError("two served tasks have the same name")
        self.runs: dict[str, TrainedRun] = {}
        for task in tasks:
            self.runs.setdefault(task.run_name, task.run)
        self._qualified = {task.key: task for task in tasks}
        self.engine = engine if engine is not None or not self.runs else merged_engine(self.runs)

    @classmethod
    def from_runs(cls, runs: dict[str, TrainedRun], plain: bool | None = None) -> Catalog:
        """Every task of every run (``plain``: named without the run; default: when there is one run)."""
        for name in runs:
            if not name or "/" in name:
                raise ConfigError(f"run name {name!r}: expected a non-empty name without '/'")
        plain = len(runs) == 1 if plain is None else plain
        return cls([ServedTask(task if plain else qualified(run_name, task), run_name, run, task)
                    for run_name, run in runs.items() for task in run.tasks])

    def resolve(self, name: str) -> ServedTask:
        task = self.tasks.get(name) or self._qualified.get(name)
        if task is not None:
            return task
        hint = ""
        similar = [served for served in self.tasks if served.rsplit("/", 1)[-1] == name][:10]
        if similar:
            hint = f" (tasks are named run/task here: {', '.join(similar)})"
        served = list(self.tasks)
        listed = ", ".join(served[:20]) + (f" and {len(served) - 20} more (GET /v1/tasks)" if len(served) > 20 else "")
        raise UnknownTask(f"task {name!r} is not served{hint}; served tasks: {listed or 'none'}")

    def parse(self, name: str, inputs: list[Any]) -> list[Item]:
        """Items of one task's raw inputs; UnknownTask, or DataError naming the first malformed input."""
        task = self.resolve(name)
        return [Item(task, example, self) for example in task.run.parse_inputs(task.task_name, inputs)]

    def describe(self) -> dict[str, Any]:
        """GET /v1/tasks: the runs, and every task with its type, labels and input format."""
        runs = [{"name": name, "encoder": run.experiment.encoder.name, "method": run.experiment.method,
                 "tasks": [task.name for task in self.tasks.values() if task.run_name == name]}
                for name, run in self.runs.items()]
        return {"runs": runs, "tasks": [task.describe() for task in self.tasks.values()]}

    def text_tasks(self) -> list[ServedTask]:
        return [task for task in self.tasks.values() if task.takes_text]

    def predict(self, items: list[Item]) -> list[dict[str, Any]]:
        """One prediction per item, in order, from one mixed-task model pass over every run's tasks (items
        parsed against an earlier catalog, while the runs changed, are answered by that catalog)."""
        results: list[Any] = [None] * len(items)
        by_catalog: dict[int, list[int]] = {}
        for index, item in enumerate(items):
            by_catalog.setdefault(id(item.catalog), []).append(index)
        for indices in by_catalog.values():
            catalog = items[indices[0]].catalog
            for index, prediction in zip(indices, catalog._predict_own([items[i] for i in indices])):
                results[index] = prediction
        return results

    def _predict_own(self, items: list[Item]) -> list[dict[str, Any]]:
        by_task: dict[str, list[int]] = {}
        for index, item in enumerate(items):
            by_task.setdefault(item.task.key, []).append(index)
        examples = {key: [items[i].example for i in indices] for key, indices in by_task.items()}
        features = None
        if all(item.features is not None for item in items):  # tokenized once, while the request was parsed
            features = {key: [replace(f, example_index=position) for position, i in enumerate(indices)
                              for f in items[i].features] for key, indices in by_task.items()}
        predictions = self.engine.predict(examples, features)
        results: list[Any] = [None] * len(items)
        for key, indices in by_task.items():
            for index, prediction in zip(indices, predictions[key]):
                results[index] = prediction
        return results


# ---- loading
@dataclass(frozen=True)
class RunSpec:
    path: Path
    name: str | None = None  # the namespace; default: the run's experiment name

    @classmethod
    def parse(cls, spec: str) -> RunSpec:
        """``DIR`` or ``NAME=DIR`` (a directory whose own name holds '=' is taken whole)."""
        name, sep, path = spec.partition("=")
        if sep and name and path and not Path(spec).exists():
            return cls(Path(path), name)
        return cls(Path(spec))


def _read_meta(path: Path) -> dict[str, Any]:
    return read_meta(checkpoint_dir(path))  # CheckpointError (one line) when there is none, or it is damaged


def _needs_pooler(meta: dict[str, Any], path: Path) -> bool:
    configs = [from_dict(TaskConfig, saved["config"], source=f"{path}/checkpoint/meta.json") for saved in meta["tasks"]]
    return any(config.head.pooling == "pooler" for config in configs)


def check_shareable(specs: list[RunSpec], metas: list[dict[str, Any]]) -> None:
    """Runs served together must be trained on one encoder and leave it and their inputs untouched (a fully
    fine-tuned or LoRA run brings an encoder of its own, a prompt run longer inputs, neither of which could share a
    model pass); checked before anything loads."""
    if len(specs) < 2:
        return
    for spec, meta in zip(specs, metas):
        reason = solo_reason(meta["method"])
        if reason is not None:
            raise ConfigError(f"{spec.path}: method {meta['method']!r} {reason}, so this run cannot be served with "
                              f"other runs; serve it alone")
    first, first_encoder = specs[0], metas[0]["encoder"]
    for spec, meta in zip(specs[1:], metas[1:]):
        encoder = meta["encoder"]
        # Fingerprints of two versions cannot be compared here; load_run checks those against the loaded encoder.
        comparable = not is_legacy_fingerprint(encoder["fingerprint"]) and not is_legacy_fingerprint(
            first_encoder["fingerprint"])
        if comparable and encoder["fingerprint"] != first_encoder["fingerprint"]:
            raise ConfigError(f"runs served together must share one encoder: {first.path} was trained on "
                              f"{first_encoder['name']!r} (fingerprint {first_encoder['fingerprint']}), {spec.path} "
                              f"on {encoder['name']!r} (fingerprint {encoder['fingerprint']}); serve them from "
                              f"separate processes")


def load_catalog(specs: list[str], **load_options: Any) -> Catalog:
    """Load ``DIR`` / ``NAME=DIR`` runs onto one encoder (the later runs are checked against it by fingerprint);
    ``load_options`` go to :func:`load_run` (device, precision, batch_size)."""
    return load_fleet(specs, **load_options).catalog


def load_fleet(specs: list[str], store: Path | None = None, **load_options: Any):
    """The runs given (``DIR`` / ``NAME=DIR``), checked before anything loads, plus every run of ``store``."""
    from multitask.serve.fleet import Fleet

    if not specs and store is None:
        raise ConfigError("give at least one run directory, or --store DIR")
    if store is not None and not Path(store).is_dir():
        raise ConfigError(f"--store {store}: not a folder (create it, then add runs to it)")
    parsed = [RunSpec.parse(spec) for spec in specs]
    metas = [_read_meta(spec.path) for spec in parsed]
    names = [spec.name or meta["experiment"]["name"] for spec, meta in zip(parsed, metas)]
    repeated = next((name for name in names if names.count(name) > 1), None)
    if repeated is not None:
        raise ConfigError(f"two runs are named {repeated!r}; name them apart with NAME=DIR")
    check_shareable(parsed, metas)
    fleet = Fleet(load_options, Path(store) if store is not None else None)
    # The shared encoder is loaded by the first run that pools with it, so it has its pooler when any run needs it.
    order = sorted(range(len(parsed)), key=lambda i: not _needs_pooler(metas[i], parsed[i].path))
    for i in order:
        fleet.add(names[i], parsed[i].path, origin="command line", publish=False)
    fleet.runs = {name: fleet.runs[name] for name in names}  # served in the order given
    fleet.sync_store()
    fleet.publish()
    return fleet
