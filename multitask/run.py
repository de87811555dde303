"""A trained run loaded back from its directory: evaluate it, or predict on raw inputs (the Python API)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from multitask.backbone import (
    encoder_fingerprint, encoder_shape, fingerprint_matches, is_legacy_fingerprint, load_encoder,
)
from multitask.config import from_dict
from multitask.data.root import data_root
from multitask.errors import CheckpointError, ConfigError, DataError
from multitask.experiment import ExperimentConfig
from multitask.model import MultiTaskModel
from multitask.prefix.bank import PrefixLayout
from multitask.prefix.config import PrefixConfig
from multitask.reporting import RunReport, TaskReport, write_reports
from multitask.runtime import add_lora, build_heads, load_tokenizer
from multitask.tasks.base import TaskType
from multitask.tasks.config import SplitSource, TaskConfig
from multitask.tasks.loading import load_task_data, read_split, task_type_from_config
from multitask.training.checkpoint import read_checkpoint
from multitask.training.evaluation import evaluate
from multitask.training.trainer import resolve_device
from multitask.utils.atomic import write_jsonl


@dataclass
class TrainedRun:
    """A frozen encoder with a run's prefixes and heads; ``predict`` takes raw inputs for any of its tasks."""

    run_dir: Path
    experiment: ExperimentConfig
    model: MultiTaskModel
    tokenizer: Any
    tasks: dict[str, TaskType]
    device: torch.device

    def task(self, name: str) -> TaskType:
        if name not in self.tasks:
            raise ConfigError(f"task {name!r} is not in run {self.run_dir}; its tasks: {', '.join(self.tasks)}")
        return self.tasks[name]

    @property
    def name(self) -> str:
        return self.experiment.name

    def parse_inputs(self, task_name: str, inputs: list[Any]) -> list[Any]:
        """Examples of raw inputs; ConfigError for an unknown task, DataError naming the first malformed input."""
        task = self.task(task_name)
        if not isinstance(inputs, list):
            raise DataError(f"task {task_name!r}: inputs must be a list, got {type(inputs).__name__}")
        return [task.example_from_raw(raw, index) for index, raw in enumerate(inputs)]

    def predict_examples(self, examples: dict[str, list[Any]], batch_size: int = 32) -> dict[str, list[dict[str, Any]]]:
        """Predictions for parsed examples of several tasks."""
        results = {}
        for task_name, task_examples in examples.items():
            task = self.task(task_name)
            features = task.featurize(task_examples, self.tokenizer, training=False)
            results[task_name] = evaluate(self.model, task, task_examples, features, batch_size, self.device,
                                          self.experiment.precision, self.tokenizer.pad_token_id or 0).predictions
        return results

    def predict_many(self, inputs: dict[str, list[Any]], batch_size: int = 32) -> dict[str, list[dict[str, Any]]]:
        """Predictions for raw inputs of several tasks at once: {task: [input, ...]} -> {task: [prediction, ...]}."""
        return self.predict_examples({name: self.parse_inputs(name, raw) for name, raw in inputs.items()}, batch_size)

    def predict(self, task_name: str, inputs: list[Any], batch_size: int = 32) -> list[dict[str, Any]]:
        """Predictions for raw inputs (text / text pairs, sentences or token lists, question + context)."""
        return self.predict_many({task_name: inputs}, batch_size)[task_name]

    def analyze(self, texts: list[str], tasks: list[str] | None = None) -> list[dict[str, Any]]:
        """Every requested task (default: those that take a plain text) for each text: one {task: prediction} per
        text. QA needs a question and a context, so it is only run when asked for with {question, context} inputs."""
        names = tasks if tasks is not None else [n for n, t in self.tasks.items() if t.config.type != "qa"]
        predictions = self.predict_many({name: list(texts) for name in names})
        return [{name: predictions[name][i] for name in names} for i in range(len(texts))]

    def evaluate_split(self, task_name: str, split: str, examples: list[Any], batch_size: int = 64):
        task = self.task(task_name)
        features = task.featurize(examples, self.tokenizer, training=False)
        return evaluate(self.model, task, examples, features, batch_size, self.device, self.experiment.precision,
                        self.tokenizer.pad_token_id or 0)


def _rebuild_model(meta: dict[str, Any], tasks: dict[str, TaskType], encoder) -> MultiTaskModel:
    heads = build_heads(list(tasks.values()), encoder_shape(encoder.config).hidden_size)
    saved = meta["prefix_layout"]
    layout = None
    if saved["task_prefixes"]:
        layout = PrefixLayout(
            prefixes={name: PrefixConfig(**cfg) for name, cfg in saved["prefixes"].items()},
            task_prefixes={task: tuple(names) for task, names in saved["task_prefixes"].items()},
        )
    return MultiTaskModel(encoder, heads, layout)


def load_run(run_dir: str | Path, encoder=None, tokenizer=None, device: str = "auto") -> TrainedRun:
    """Load a run directory; the encoder must be the one the run was trained on (checked by fingerprint)."""
    run_dir = Path(run_dir)
    meta, weights = read_checkpoint(run_dir)
    experiment = from_dict(ExperimentConfig, meta["experiment"], source=f"{run_dir}/checkpoint/meta.json")
    name = meta["encoder"]["name"]
    tasks = {}
    for saved in meta["tasks"]:
        config = from_dict(TaskConfig, saved["config"], source=f"{run_dir}/checkpoint/meta.json")
        task = task_type_from_config(config, f"{run_dir}/checkpoint/meta.json")
        task.labels = list(saved["labels"])
        tasks[config.name] = task
    fingerprint = meta["encoder"]["fingerprint"]
    checked = meta["method"] != "full_ft"
    # Fingerprints saved before v2 hashed the pooler too: checking one needs the checkpoint's pooler loaded.
    legacy = checked and is_legacy_fingerprint(fingerprint)
    if encoder is None:
        encoder = load_encoder(name, experiment.encoder.attention,
                               with_pooler=any(t.config.head.pooling == "pooler" for t in tasks.values()),
                               checkpoint_pooler=legacy)
    if checked and not fingerprint_matches(encoder, fingerprint):
        hint = ("; an older version saved this fingerprint over the pooler too, a random one where the checkpoint "
                "ships none: such a run cannot be checked, retrain it") if legacy else ""
        raise CheckpointError(f"{run_dir}: this run was trained on encoder {name!r} with fingerprint "
                              f"{fingerprint}, but the encoder given has fingerprint "
                              f"{encoder_fingerprint(encoder)}; load it with the same encoder{hint}")
    model = _rebuild_model(meta, tasks, encoder)
    if experiment.method == "lora":
        add_lora(model.encoder, experiment.lora)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    trained_missing = [k for k in missing if not k.startswith("encoder.")]
    # Fully fine-tuned runs saved before the pooler was left out carry its weights; no head of theirs reads it.
    unexpected = [k for k in unexpected if not k.startswith("encoder.pooler.")]
    if trained_missing or unexpected:
        raise CheckpointError(f"{run_dir}: checkpoint does not match its own meta.json "
                              f"(missing {trained_missing[:3]}, unexpected {unexpected[:3]})")
    target = resolve_device(device)
    return TrainedRun(run_dir, experiment, model.to(target).eval(),
                      tokenizer or load_tokenizer(name), tasks, target)


def read_input_file(path: Path) -> list[Any]:
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: expected one JSON value per line ({error.msg})") from None
    return rows


def predict_file(run: TrainedRun, task_name: str, input_path: Path, output_path: Path) -> int:
    rows = read_input_file(input_path)
    try:
        predictions = run.predict(task_name, rows)
    except DataError as error:
        raise DataError(f"{input_path}: {error}") from None
    write_jsonl(output_path, predictions)
    return len(predictions)


def evaluate_run(
    run: TrainedRun, output_dir: Path, task_name: str | None = None, file: Path | None = None,
    split_name: str = "custom", file_format: SplitSource | None = None,
) -> RunReport:
    """Evaluate every task on its own splits, or one task on a file in that task's format."""
    report = RunReport(tasks={}, meta={"run_name": run.experiment.name, "encoder": run.experiment.encoder.name,
                                       "evaluated_run": str(run.run_dir)})
    root = data_root(run.experiment.data_root)
    for name, task in run.tasks.items():
        if task_name is not None and name != task_name:
            continue
        if file is not None:
            source = file_format or task.config.data.validation or task.config.data.train
            examples = {split_name: task.examples(read_split(SplitSource(source.format, str(file.resolve()),
                                                                         source.options), root, str(file)))}
        else:
            loaded = load_task_data(task, root, name)
            examples = {s: e for s, e in loaded.examples.items() if s != "train"}
        results = {}
        for split, split_examples in examples.items():
            evaluation = run.evaluate_split(name, split, split_examples)
            write_jsonl(output_dir / "predictions" / f"{name}.{split}.jsonl", evaluation.predictions)
            if evaluation.result is not None:
                results[split] = evaluation.result
        report.tasks[name] = TaskReport(name, task.config.type, task.main_metric(), results)
    if task_name is not None and not report.tasks:
        raise ConfigError(f"task {task_name!r} is not in run {run.run_dir}; its tasks: {', '.join(run.tasks)}")
    write_reports(report, output_dir)
    return report
