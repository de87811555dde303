"""Assemble what a run needs from an experiment config: tokenizer, tasks with features, and the model."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel

from multitask.backbone import encoder_shape, resolve_encoder_name
from multitask.data.cache import cache_key, cached, tokenizer_fingerprint
from multitask.data.root import data_root
from multitask.errors import ConfigError
from multitask.experiment import ExperimentConfig, LoraSettings, TaskEntry
from multitask.heads import HEADS
from multitask.model import MultiTaskModel
from multitask.prefix.bank import TaskPrefixRequest, plan_layout
from multitask.prompt.bank import PromptBank
from multitask.prompt.config import PromptConfig
from multitask.tasks.base import Feature, TaskType, featurize_examples
from multitask.tasks.loading import load_task, load_task_data
from multitask.tuning import TaskTuning, resolve_tuning

log = logging.getLogger(__name__)


@dataclass
class TaskRuntime:
    """One task of a run: its type, examples and features per split, and its batch size."""

    task: TaskType
    examples: dict[str, list[Any]]
    features: dict[str, list[Feature]]  # "train" holds training features; other splits evaluation features
    batch_size: int

    @property
    def name(self) -> str:
        return self.task.config.name


def load_tokenizer(encoder_name: str):
    source = resolve_encoder_name(encoder_name)
    # Byte-level BPE (RoBERTa) needs a prefix space to tokenize pre-split words (NER) like running text.
    extra = {"add_prefix_space": True} if AutoConfig.from_pretrained(source).model_type == "roberta" else {}
    tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"encoder {encoder_name!r}: a fast tokenizer is needed (offsets and word ids)")
    return tokenizer


def resolve_task_file(entry: TaskEntry, config_path: Path | None) -> Path:
    """Task files are looked up beside the experiment config first, then from the working directory."""
    candidates = [Path(entry.file)]
    if config_path is not None:
        candidates.insert(0, config_path.parent / entry.file)
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise ConfigError(f"{config_path or '<config>'}: task file not found: {entry.file}")


def load_tasks(experiment: ExperimentConfig, config_path: Path | None) -> list[tuple[TaskEntry, TaskType, str]]:
    loaded, names = [], set()
    for entry in experiment.tasks:
        path = resolve_task_file(entry, config_path)
        task = load_task(path, entry.overrides)
        if task.config.name in names:
            raise ConfigError(f"{path}: task name {task.config.name!r} is used twice in the experiment")
        names.add(task.config.name)
        loaded.append((entry, task, str(path)))
    return loaded


def _featurize(task: TaskType, examples: list[Any], tokenizer, training: bool, cache_dir: str, token_hash: str):
    key = cache_key(token_hash, {"config": task.config, "labels": task.labels}, examples, training)
    features, hit = cached(cache_dir, key,
                           lambda: featurize_examples(task, examples, tokenizer, training, progress=True))
    log.info("task %s: %d features (%s)", task.config.name, len(features), "cached" if hit else "tokenized")
    return features


def prepare_tasks(
    experiment: ExperimentConfig, config_path: Path | None, tokenizer, splits: tuple[str, ...] | None = None
) -> list[TaskRuntime]:
    """Load each task's data and featurize it (through the on-disk cache)."""
    root = data_root(experiment.data_root)
    token_hash = tokenizer_fingerprint(tokenizer)
    runtimes = []
    for entry, task, source in load_tasks(experiment, config_path):
        loaded = load_task_data(task, root, source)
        examples = {
            split: items[: entry.limit_train if split == "train" else entry.limit_eval]
            for split, items in loaded.examples.items()
            if splits is None or split in splits
        }
        features = {
            split: _featurize(task, items, tokenizer, split == "train", experiment.cache_dir, token_hash)
            for split, items in examples.items()
        }
        runtimes.append(TaskRuntime(task, examples, features, entry.batch_size or experiment.optimization.batch_size))
    return runtimes


def build_heads(tasks: list[TaskType], hidden_size: int) -> dict[str, torch.nn.Module]:
    """One head per task, of the kind its type asks for, with the task's head settings."""
    return {t.config.name: HEADS.get(t.head_kind)(t.config.head, hidden_size, t.num_outputs) for t in tasks}


def prefix_request(task: TaskType, tuning: TaskTuning) -> TaskPrefixRequest:
    """What one task asks of the prefix bank, from its resolved settings."""
    chosen = tuning.sources["prefix_attention"] in ("task file", "experiment")  # not just the type's default
    return TaskPrefixRequest(task.config.name, task.config.prefix.group, tuning.prefix_length, tuning.reparameterize,
                             tuning.prefix_dropout, task.config.prefix.layers, tuning.prefix_attention, chosen)


def prefix_requests(tasks: list[TaskType], tunings: dict[str, TaskTuning]) -> list[TaskPrefixRequest]:
    return [prefix_request(task, tunings[task.config.name]) for task in tasks]


def build_model(
    experiment: ExperimentConfig, tasks: list[TaskType], encoder: PreTrainedModel,
    tunings: dict[str, TaskTuning] | None = None,
) -> MultiTaskModel:
    """Heads for every task, plus the prefix bank for the prefix method or the prompt bank for the prompt method
    (neither for a linear probe, LoRA or full FT). ``tunings``: the tasks' resolved settings, when the caller has
    them already."""
    heads = build_heads(tasks, encoder_shape(encoder.config).hidden_size)
    layout = None
    if experiment.method == "prefix":
        tunings = tunings if tunings is not None else resolve_tuning(experiment, tasks)
        layout = plan_layout(experiment.prefix, prefix_requests(tasks, tunings))
    prompts = build_prompt_bank(experiment.prompt, tasks, encoder) if experiment.method == "prompt" else None
    model = MultiTaskModel(encoder, heads, layout, freeze_encoder=experiment.method != "full_ft", prompt_bank=prompts)
    if experiment.method == "lora":
        add_lora(model.encoder, experiment.lora)
    return model


def usable_positions(config) -> int:
    """Positions an input may fill: RoBERTa-family position ids start after the padding id, so fewer than its
    ``max_position_embeddings``."""
    offset = config.pad_token_id + 1 if config.model_type in ("roberta", "xlm-roberta") else 0
    return config.max_position_embeddings - offset


def build_prompt_bank(config: PromptConfig, tasks: list[TaskType], encoder: PreTrainedModel) -> PromptBank:
    """One prompt per task in the word-embedding space; refused where a task's longest input and the prompt would
    not fit the encoder's positions together."""
    limit = usable_positions(encoder.config)
    for task in tasks:
        if task.config.max_length + config.length > limit:
            raise ConfigError(f"task {task.config.name}: max_length {task.config.max_length} + prompt length "
                              f"{config.length} exceeds the encoder's {limit} positions; lower the task's "
                              f"max_length (overrides: {{max_length: {limit - config.length}}}) or prompt.length")
    dim = encoder.get_input_embeddings().embedding_dim
    return PromptBank([t.config.name for t in tasks], config, dim)


def add_lora(encoder: PreTrainedModel, settings: LoraSettings) -> None:
    """Inject PEFT's LoRA layers in place; only they (and the heads) train, the encoder stays frozen."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.target_modules))
    inject_adapter_in_model(config, encoder)
    for name, parameter in encoder.named_parameters():
        parameter.requires_grad_(".lora_" in name)
