"""Start prefixes and heads from an earlier run (``prefix.init_from``) and freeze some prefixes (``prefix.freeze``):
the multi-task-then-specialise recipe (a shared prefix trained on every task, then task prefixes on top of it).
``encoder.init_from`` starts a full fine-tuning run from another's fine-tuned encoder (intermediate-task training)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from multitask.checkpoint import read_checkpoint
from multitask.errors import CheckpointError, ConfigError
from multitask.experiment import ExperimentConfig
from multitask.model import MultiTaskModel
from multitask.prefix.config import PrefixConfig
from multitask.prefix.encoder import PrefixEncoder

log = logging.getLogger(__name__)


@torch.no_grad()
def init_from_run(model: MultiTaskModel, run_dir: str | Path, fingerprint: str) -> list[str]:
    """Copy the run's prefixes and heads whose names this model has; returns what was copied. Prefixes must have
    the same length and layers (a checkpoint stores them flat, so either form here starts from the same
    keys/values); heads must have the same shape."""
    run_dir = Path(run_dir)
    meta, weights = read_checkpoint(run_dir)
    if meta["encoder"]["fingerprint"] != fingerprint:
        raise CheckpointError(f"prefix.init_from {run_dir}: that run was trained on encoder "
                              f"{meta['encoder']['name']!r} (fingerprint {meta['encoder']['fingerprint']}), this one "
                              f"has fingerprint {fingerprint}; its prefixes only fit the encoder they were trained on")
    copied = []
    saved = meta["prefix_layout"]["prefixes"]
    bank = model.prefix_bank
    for name, ours in (bank.encoders.items() if bank is not None else ()):
        if name not in saved:
            continue
        theirs = PrefixEncoder(PrefixConfig(**saved[name]), ours.encoder_layers, ours.num_heads, ours.head_dim)
        if (theirs.length, theirs.layers) != (ours.length, ours.layers):
            raise ConfigError(f"prefix.init_from {run_dir}: prefix {name!r} there has {theirs.length} tokens in layers "
                              f"{list(theirs.layers)}, here {ours.length} in {list(ours.layers)}; make them match")
        theirs.embedding.copy_(weights[f"prefix_bank.encoders.{name}.embedding"])
        ours.set_initial(theirs())
        copied.append(f"prefix {name}")
    for task in model.task_names:
        head = model.heads[task]
        state = {key[len(f"heads.{task}."):]: value for key, value in weights.items() if key.startswith(f"heads.{task}.")}
        if state and all(key in state and state[key].shape == value.shape for key, value in head.state_dict().items()):
            head.load_state_dict(state)
            copied.append(f"head {task}")
    if not copied:
        raise ConfigError(f"prefix.init_from {run_dir}: no prefix or head there has a name this run uses "
                          f"(there: {', '.join(saved) or 'none'}; here: {', '.join(bank.encoders) if bank else 'none'})")
    log.info("init_from %s: %s", run_dir, ", ".join(copied))
    return copied


def freeze_prefixes(model: MultiTaskModel, names: list[str]) -> None:
    """Stop the named prefixes from training. A reparameterised one is folded first, so its keys/values stay
    exactly as they are (and the frozen-layer cache may treat it as a constant)."""
    bank = model.prefix_bank
    known = list(bank.encoders) if bank is not None else []
    for name in names:
        if name not in known:
            raise ConfigError(f"prefix.freeze: no prefix named {name!r}; this run's prefixes: "
                              f"{', '.join(known) or 'none (method is not prefix)'}")
        bank.encoders[name] = bank.encoders[name].fold()
        bank.encoders[name].requires_grad_(False)


# Weights a fully fine-tuned run may or may not carry (no head of it read the pooler): never required to match.
OPTIONAL_ENCODER_WEIGHTS = "pooler."


@torch.no_grad()
def init_encoder_from_run(encoder: torch.nn.Module, run_dir: str | Path, experiment: ExperimentConfig) -> int:
    """Copy a full_ft run's fine-tuned encoder weights into ``encoder``; returns how many tensors were copied.
    STILTs-style intermediate training: fine-tune on a related task first, then on the experiment's own tasks,
    whose heads start fresh (the tasks differ, so the earlier run's heads are not copied)."""
    where = f"encoder.init_from {run_dir}"
    if experiment.method != "full_ft":
        raise ConfigError(f"{where}: only a full fine-tuning run (method: full_ft) starts from another run's encoder; "
                          f"this one is method {experiment.method}")
    meta, weights = read_checkpoint(Path(run_dir))
    if meta["method"] != "full_ft":
        raise ConfigError(f"{where}: that run was trained with method {meta['method']}; only a full_ft run saves a "
                          f"fine-tuned encoder")
    if meta["encoder"]["name"] != experiment.encoder.name:
        raise ConfigError(f"{where}: that run fine-tuned encoder {meta['encoder']['name']!r}, this one loads "
                          f"{experiment.encoder.name!r}; name the same encoder")
    saved = {key[len("encoder."):]: value for key, value in weights.items() if key.startswith("encoder.")}
    own = dict(encoder.named_parameters())
    unmatched = sorted(name for name in set(own) ^ set(saved) if not name.startswith(OPTIONAL_ENCODER_WEIGHTS))
    unmatched += [name for name in saved if name in own and own[name].shape != saved[name].shape]
    if unmatched:
        raise CheckpointError(f"{where}: its encoder weights do not fit this encoder (first: "
                              f"{', '.join(unmatched[:3])}); retrain that run or name another")
    copied = [name for name in saved if name in own]
    for name in copied:
        own[name].copy_(saved[name])
    log.info("encoder.init_from %s: %d encoder weights", run_dir, len(copied))
    return len(copied)
