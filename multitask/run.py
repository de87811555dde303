"""A trained run loaded back from its directory: evaluate it, or predict on raw inputs (the Python API)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from multitask.data.root import data_root
from multitask.device import cast_frozen_encoder, enable_tf32, resolve_device
from multitask.errors import ConfigError, DataError
from multitask.experiment import ExperimentConfig
from multitask.inference import Evaluation, InferenceEngine
from multitask.inference.loading import load_checkpoint_model
from multitask.model import MultiTaskModel
from multitask.precision import resolve_precision
from multitask.reporting import RunReport, TaskReport, write_reports
from multitask.runtime import load_tokenizer
from multitask.tasks.base import TaskType
from multitask.tasks.config import SplitSource
from multitask.tasks.loading import load_task_data, read_split
from multitask.utils.atomic import write_jsonl


@dataclass
class TrainedRun:
    """A frozen encoder with a run's prefixes and heads; ``predict`` takes raw inputs for any of its tasks."""

    run_dir: Path
    experiment: ExperimentConfig
    engine: InferenceEngine

    @property
    def name(self) -> str:
        return self.experiment.name

    @property
    def model(self) -> MultiTaskModel:
        return self.engine.model

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def tasks(self) -> dict[str, TaskType]:
        return self.engine.tasks

    def task(self, name: str) -> TaskType:
        if name not in self.tasks:
            raise ConfigError(f"task {name!r} is not in run {self.run_dir}; its tasks: {', '.join(self.tasks)}")
        return self.tasks[name]

    def parse_inputs(self, task_name: str, inputs: list[Any], all_scores: bool = False) -> list[Any]:
        """Examples of raw inputs; ConfigError for an unknown task, DataError naming the first malformed input.
        ``all_scores``: their predictions give every label's score (classification), not only the chosen one's."""
        task = self.task(task_name)
        if not isinstance(inputs, list):
            raise DataError(f"task {task_name!r}: inputs must be a list, got {type(inputs).__name__}")
        examples = [task.example_from_raw(raw, index) for index, raw in enumerate(inputs)]
        if all_scores:
            for example in examples:
                task.request_all_scores(example)
        return examples

    def predict_examples(self, examples: dict[str, list[Any]]) -> dict[str, list[dict[str, Any]]]:
        """Predictions for parsed examples of several tasks, in one mixed-task pass."""
        for name in examples:
            self.task(name)
        return self.engine.predict(examples)

    def predict_many(self, inputs: dict[str, list[Any]], all_scores: bool = False) -> dict[str, list[dict[str, Any]]]:
        """Predictions for raw inputs of several tasks at once: {task: [input, ...]} -> {task: [prediction, ...]}."""
        return self.predict_examples({name: self.parse_inputs(name, raw, all_scores) for name, raw in inputs.items()})

    def predict(self, task_name: str, inputs: list[Any], all_scores: bool = False) -> list[dict[str, Any]]:
        """Predictions for raw inputs (text / text pairs, sentences or token lists, question + context)."""
        return self.predict_many({task_name: inputs}, all_scores)[task_name]

    def text_tasks(self) -> list[str]:
        """The tasks that take a plain text as input (every type but QA, which needs a question and a context)."""
        return [name for name, task in self.tasks.items() if task.accepts_plain_text]

    def analyze(
        self, texts: list[Any], tasks: list[str] | None = None, all_scores: bool = False
    ) -> list[dict[str, Any]]:
        """Every requested task (default: every task that takes a plain text) for each text, in one mixed-task
        pass: one {task: prediction} per text."""
        names = self.text_tasks() if tasks is None else list(tasks)
        predictions = self.predict_many({name: list(texts) for name in names}, all_scores)
        return [{name: predictions[name][i] for name in names} for i in range(len(texts))]

    def evaluate_split(self, task_name: str, examples: list[Any]) -> Evaluation:
        self.task(task_name)
        return self.engine.evaluate(task_name, examples)


def load_run(
    run_dir: str | Path, encoder=None, tokenizer=None, device: str = "auto", precision: str | None = None,
    batch_size: int | None = None, progress: bool = False,
) -> TrainedRun:
    """Load a run directory; the encoder must be the one the run was trained on (checked by fingerprint).

    ``precision``: auto, fp32, bf16 or fp16 (default: the run's own setting); ``batch_size``: inputs per forward
    pass (default: the run's evaluation batch size); ``progress``: tqdm bars for long featurization and inference.
    """
    run_dir = Path(run_dir)
    loaded = load_checkpoint_model(run_dir, encoder)
    experiment = loaded.experiment
    target = resolve_device(device)
    if loaded.model.prefix_bank is not None:
        loaded.model.prefix_bank.fold()  # an MLP prefix computes the same keys/values every time: compute them once
    chosen = resolve_precision(precision or experiment.precision, target)[0]
    model = _on_device(loaded.model, target)
    enable_tf32(target)
    if encoder is None:  # an encoder given is shared with other runs: its owner decides its precision
        cast_frozen_encoder(model, target, chosen, experiment.method)
    engine = InferenceEngine(
        model, tokenizer or load_tokenizer(experiment.encoder.name), loaded.tasks, target, chosen,
        batch_size or experiment.evaluation.batch_size, progress,
    )
    return TrainedRun(run_dir, experiment, engine)


def _on_device(model: MultiTaskModel, device: torch.device) -> MultiTaskModel:
    """The model on ``device``; a shared encoder already there is not walked again (a server loading thousands of
    runs onto one encoder would spend most of its time in that walk)."""
    if next(model.encoder.parameters()).device != device:
        return model.to(device)
    for part in (model.heads, model.prefix_bank):
        if part is not None:
            part.to(device)
    return model


def read_input_file(path: Path) -> list[Any]:
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {error.start}); "
                        f"save the file as UTF-8 JSONL") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: expected one JSON value per line ({error.msg})") from None
    return rows


def predict_file(run: TrainedRun, task_name: str, input_path: Path, output_path: Path, all_scores: bool = False) -> int:
    rows = read_input_file(input_path)
    try:
        predictions = run.predict(task_name, rows, all_scores)
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
            evaluation = run.evaluate_split(name, split_examples)
            write_jsonl(output_dir / "predictions" / f"{name}.{split}.jsonl", evaluation.predictions)
            if evaluation.result is not None:
                results[split] = evaluation.result
        report.tasks[name] = TaskReport(name, task.config.type, task.main_metric(), results)
    if task_name is not None and not report.tasks:
        raise ConfigError(f"task {task_name!r} is not in run {run.run_dir}; its tasks: {', '.join(run.tasks)}")
    write_reports(report, output_dir)
    return report
