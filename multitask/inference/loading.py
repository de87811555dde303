"""Assemble a trained model from a run's checkpoint: tasks, encoder (checked by fingerprint), prefixes, heads."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multitask.backbone import (
    encoder_fingerprint, encoder_shape, fingerprint_matches, is_legacy_fingerprint, load_encoder,
)
from multitask.checkpoint import read_checkpoint
from multitask.config import from_dict
from multitask.errors import CheckpointError
from multitask.experiment import ExperimentConfig
from multitask.model import MultiTaskModel
from multitask.prefix.bank import PrefixLayout
from multitask.prefix.config import PrefixConfig
from multitask.prefix.encoder import without_initialization
from multitask.prompt.bank import PromptBank
from multitask.runtime import add_lora, build_heads
from multitask.tasks.base import TaskType
from multitask.tasks.config import TaskConfig
from multitask.tasks.loading import task_type_from_config


@dataclass
class LoadedCheckpoint:
    experiment: ExperimentConfig
    tasks: dict[str, TaskType]
    model: MultiTaskModel  # on the CPU, in eval mode


def _saved_tasks(meta: dict[str, Any], source: str) -> dict[str, TaskType]:
    tasks = {}
    for saved in meta["tasks"]:
        config = from_dict(TaskConfig, saved["config"], source=source)
        task = task_type_from_config(config, source)
        task.labels = list(saved["labels"])
        task.check_label_names()
        tasks[config.name] = task
    return tasks


def _saved_layout(meta: dict[str, Any], source: str) -> PrefixLayout | None:
    saved = meta["prefix_layout"]
    if not saved["task_prefixes"]:
        return None
    attention = saved.get("attention", "joint")  # runs before attention: separate were all joint
    if isinstance(attention, str):  # runs before per-task attention: one setting for every prefix
        attention = dict.fromkeys(saved["prefixes"], attention)
    return PrefixLayout(
        # from_dict: a damaged entry is a one-line ConfigError naming meta.json, not a TypeError
        prefixes={name: from_dict(PrefixConfig, cfg, source=source, path=f"prefix_layout.prefixes.{name}")
                  for name, cfg in saved["prefixes"].items()},
        task_prefixes={task: tuple(names) for task, names in saved["task_prefixes"].items()},
        attention=attention,
        mixtures={name: tuple(sources) for name, sources in saved.get("mixtures", {}).items()},
    )


def _rebuild_model(experiment: ExperimentConfig, layout: PrefixLayout | None, tasks: dict[str, TaskType],
                   encoder) -> MultiTaskModel:
    heads = build_heads(list(tasks.values()), encoder_shape(encoder.config).hidden_size)
    prompts = None
    if experiment.method == "prompt":  # saved folded: flat prompts, whatever encoder produced them in training
        flat = dataclasses.replace(experiment.prompt, encoder="none")
        prompts = PromptBank(list(tasks), flat, encoder.get_input_embeddings().embedding_dim)
    with without_initialization():  # the checkpoint's weights replace whatever the prefixes would start from
        return MultiTaskModel(encoder, heads, layout, prompt_bank=prompts)


def _check_encoder(run_dir: Path, meta: dict[str, Any], encoder, legacy: bool) -> None:
    fingerprint = meta["encoder"]["fingerprint"]
    if fingerprint_matches(encoder, fingerprint):
        return
    hint = ("; an older version saved this fingerprint over the pooler too, a random one where the checkpoint "
            "ships none: such a run cannot be checked, retrain it") if legacy else ""
    raise CheckpointError(f"{run_dir}: this run was trained on encoder {meta['encoder']['name']!r} with fingerprint "
                          f"{fingerprint}, but the encoder given has fingerprint "
                          f"{encoder_fingerprint(encoder)}; load it with the same encoder{hint}")


def _load_weights(model: MultiTaskModel, weights: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Load the checkpoint into the parts it holds weights for: missing and unexpected keys, as load_state_dict
    gives them. The frozen encoder is walked only when the checkpoint trains it (LoRA, full fine-tuning): a server
    loading thousands of small runs onto one encoder would otherwise spend most of its time there."""
    parts = {"heads": model.heads, "prefix_bank": model.prefix_bank, "prompt_bank": model.prompt_bank}
    if any(key.startswith("encoder.") for key in weights):
        parts["encoder"] = model.encoder
    missing, unexpected = [], []
    for name, module in parts.items():
        own = {key[len(name) + 1:]: value for key, value in weights.items() if key.startswith(f"{name}.")}
        if module is None:
            unexpected += [f"{name}.{key}" for key in own]
            continue
        result = module.load_state_dict(own, strict=False)
        missing += [f"{name}.{key}" for key in result.missing_keys]
        unexpected += [f"{name}.{key}" for key in result.unexpected_keys]
    unexpected += [key for key in weights if key.split(".", 1)[0] not in parts]
    return missing, unexpected


def load_checkpoint_model(run_dir: Path, encoder=None) -> LoadedCheckpoint:
    """The run's model; ``encoder`` (e.g. one already serving another run) must be the one it was trained on."""
    meta, weights = read_checkpoint(run_dir)
    source = f"{run_dir}/checkpoint/meta.json"
    experiment = from_dict(ExperimentConfig, meta["experiment"], source=source)
    tasks = _saved_tasks(meta, source)
    layout = _saved_layout(meta, source)  # before the encoder loads: a damaged meta.json fails at once
    checked = meta["method"] != "full_ft"  # a fully fine-tuned run carries its own encoder weights
    # Fingerprints saved before v2 hashed the pooler too: checking one needs the checkpoint's pooler loaded.
    legacy = checked and is_legacy_fingerprint(meta["encoder"]["fingerprint"])
    if encoder is not None and experiment.method in ("full_ft", "lora"):
        encoder = copy.deepcopy(encoder)  # this run changes the encoder's weights or modules: never a shared one
    if encoder is None:
        encoder = load_encoder(meta["encoder"]["name"], experiment.encoder.attention,
                               with_pooler=any(t.config.head.pooling == "pooler" for t in tasks.values()),
                               checkpoint_pooler=legacy)
    if checked:
        _check_encoder(run_dir, meta, encoder, legacy)
    model = _rebuild_model(experiment, layout, tasks, encoder)
    if experiment.method == "lora":
        add_lora(model.encoder, experiment.lora)
    missing, unexpected = _load_weights(model, weights)
    trained_missing = [k for k in missing if not k.startswith("encoder.")]
    # Fully fine-tuned runs saved before the pooler was left out carry its weights; no head of theirs reads it.
    unexpected = [k for k in unexpected if not k.startswith("encoder.pooler.")]
    if trained_missing or unexpected:
        raise CheckpointError(f"{run_dir}: checkpoint does not match its own meta.json "
                              f"(missing {trained_missing[:3]}, unexpected {unexpected[:3]})")
    return LoadedCheckpoint(experiment, tasks, model.eval())
