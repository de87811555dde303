"""Start a new task's prefix from a trained model's prefixes (``prefix.transfer``), and choose one by measurement.

Which source prefix helps a new task is not predictable from names or task types (DESIGN.md §6: a sentiment
prefix started a question-type classifier 21 points higher). ``auto`` therefore measures: each candidate (every
base prefix, and a fresh start) trains the new prefix and head for a few steps on most of the task's training data,
and is scored by its loss on the rest of the training data. The validation split plays no part, so it stays a fair
estimate of the finished run. SPoT (Vu et al., 2022) chose source prompts the same way, by their transfer.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from multitask.device import autocast
from multitask.errors import ConfigError
from multitask.model import ModelInputs, MultiTaskModel
from multitask.prefix.adapt import adapt_key_values
from multitask.prefix.encoder import PrefixEncoder
from multitask.prefix.mixture import input_summary

log = logging.getLogger(__name__)
FRESH, MIXTURE = "none", "mixture"
# The held-back share of the training inputs that scores the candidates of `auto` (at most HELD_MAX inputs).
HELD_SHARE, HELD_MAX = 0.2, 256


@dataclass
class TransferChoice:
    """How one new task's prefix started: the setting, the source chosen, and (auto) every candidate's score."""

    setting: str
    source: str
    scores: dict[str, float] = field(default_factory=dict)  # held-back training loss per candidate (auto)
    skipped: dict[str, str] = field(default_factory=dict)  # candidates that could not fit, and why

    def describe(self) -> dict[str, Any]:
        return {"setting": self.setting, "source": self.source, "held_back_train_loss": self.scores,
                "skipped": self.skipped}


def source_key_values(source: PrefixEncoder, layers: tuple[int, ...], length: int, name: str,
                      fill: torch.Tensor) -> torch.Tensor:
    """A base prefix's keys/values fitted to a new prefix of ``length`` tokens in ``layers``, layers it lacks taken
    from ``fill`` (ConfigError when it shares no layer with the new prefix)."""
    with torch.no_grad():
        kv = source().detach().float().cpu()
    return adapt_key_values(kv, source.layers, layers, length, name, fill.detach().float().cpu())


def candidates(model: MultiTaskModel, target_name: str, sources: list[str]) -> tuple[dict[str, torch.Tensor],
                                                                                      dict[str, str]]:
    """The keys/values each source would start ``target_name`` from, and the sources that cannot, with why."""
    bank = model.prefix_bank
    target = bank.encoders[target_name]
    with torch.no_grad():
        own = target()  # layers a source lacks keep the new prefix's own start
    fitted, skipped = {}, {}
    for name in sources:
        try:
            fitted[name] = source_key_values(bank.encoders[name], target.layers, target.length, name, own)
        except ConfigError as error:
            skipped[name] = str(error)
    return fitted, skipped


@dataclass
class ScoringData:
    """A task's training inputs split for scoring: batches to train on, and the held-back inputs to score on."""

    fit: list[int]
    held: list[int]

    @classmethod
    def split(cls, size: int, seed: int) -> "ScoringData":
        if size < 2:
            raise ConfigError("prefix.transfer: auto needs at least 2 training inputs (some to train each candidate "
                              "on, some to score it on)")
        order = list(range(size))
        random.Random(seed).shuffle(order)
        held = max(1, min(HELD_MAX, int(size * HELD_SHARE)))
        return cls(fit=sorted(order[held:]), held=sorted(order[:held]))


def score_candidates(
    model: MultiTaskModel, runtime, target_name: str, starts: dict[str, torch.Tensor | None],
    learning_rates: tuple[float, float], steps: int, device: torch.device, precision: str, pad_id: int, seed: int,
) -> dict[str, float]:
    """Each start's held-back training loss after ``steps`` AdamW steps on the new prefix and head.

    Every candidate starts from the same head and the same random stream, so only its prefix differs; afterwards the
    prefix and head are back as they were."""
    prefix, head = model.prefix_bank.encoders[target_name], model.heads[runtime.name]
    saved = {key: value.clone() for key, value in {**_prefixed(prefix, "p"), **_prefixed(head, "h")}.items()}
    data = ScoringData.split(len(runtime.features["train"]), seed)
    task_id = model.task_id(runtime.name)
    scores = {}
    try:
        for name, kv in starts.items():
            _load(prefix, head, saved)
            if kv is not None:
                prefix.set_initial(kv.to(device))
            torch.manual_seed(seed)
            _fit(model, runtime, prefix, head, data.fit, learning_rates, steps, task_id, device, precision, pad_id,
                 seed)
            scores[name] = _held_loss(model, runtime, data.held, task_id, device, precision, pad_id)
            log.info("transfer %s: candidate %s: held-back training loss %.4f after %d steps", runtime.name, name,
                     scores[name], steps)
    finally:
        _load(prefix, head, saved)
    return scores


def _prefixed(module: torch.nn.Module, tag: str) -> dict[str, torch.Tensor]:
    return {f"{tag}.{key}": value for key, value in module.state_dict().items()}


def _load(prefix: torch.nn.Module, head: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    prefix.load_state_dict({k[2:]: v for k, v in saved.items() if k.startswith("p.")})
    head.load_state_dict({k[2:]: v for k, v in saved.items() if k.startswith("h.")})


def _batches(rows: list[int], size: int, seed: int):
    """Shuffled batches of ``rows``, epoch after epoch."""
    generator = random.Random(seed)
    while True:
        order = list(rows)
        generator.shuffle(order)
        for start in range(0, len(order), size):
            yield order[start : start + size]


def _loss(model, runtime, rows: list[int], task_id: int, device, precision: str, pad_id: int):
    batch = runtime.task.collate([runtime.features["train"][i] for i in rows], pad_id)
    with autocast(device, precision):
        logits, _ = model(ModelInputs.of_task(batch, task_id).to(device))[runtime.name]
        loss = runtime.task.loss(logits, batch.targets.to(device))
    return loss, runtime.task.loss_terms(batch.targets)


def _fit(model, runtime, prefix, head, rows, learning_rates, steps, task_id, device, precision, pad_id, seed) -> None:
    prefix_lr, head_lr = learning_rates
    optimizer = torch.optim.AdamW([{"params": [p for p in prefix.parameters() if p.requires_grad], "lr": prefix_lr},
                                   {"params": [p for p in head.parameters() if p.requires_grad], "lr": head_lr}],
                                  weight_decay=0.0)
    model.train()
    batches = _batches(rows, runtime.batch_size, seed)
    for _ in range(steps):
        loss, _ = _loss(model, runtime, next(batches), task_id, device, precision, pad_id)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*prefix.parameters(), *head.parameters()], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def _held_loss(model, runtime, rows, task_id, device, precision, pad_id) -> float:
    """The held-back inputs' loss, each loss term (row, or labelled token) counting alike."""
    model.eval()
    total, terms = 0.0, 0
    for start in range(0, len(rows), runtime.batch_size):
        loss, count = _loss(model, runtime, rows[start : start + runtime.batch_size], task_id, device, precision,
                            pad_id)
        total += float(loss) * max(count, 1)
        terms += max(count, 1)
    return total / terms


def start_prefix(
    model: MultiTaskModel, runtime, target_name: str, setting: str, base_prefixes: list[str],
    scorer: Callable[[dict[str, torch.Tensor | None]], dict[str, float]],
) -> TransferChoice:
    """Set the new prefix ``target_name`` as ``setting`` says (none, a base prefix name, or auto)."""
    if setting == FRESH:
        return TransferChoice(setting, FRESH)
    if setting == MIXTURE:  # the sources were fitted into the mixture when the model was built
        sources = model.prefix_bank.layout.mixtures[target_name]
        left_out = {n: "does not fit the new prefix" for n in base_prefixes if n not in sources}
        return TransferChoice(setting, f"mixture of {', '.join(sources)}", skipped=left_out)
    if setting != "auto":
        if setting not in base_prefixes:
            raise ConfigError(f"task {runtime.name}: prefix.transfer {setting!r}: the base has no such prefix; its "
                              f"prefixes: {', '.join(base_prefixes) or 'none'}")
        fitted, skipped = candidates(model, target_name, [setting])
        if skipped:
            raise ConfigError(f"task {runtime.name}: prefix.transfer: {skipped[setting]}")
        model.prefix_bank.encoders[target_name].set_initial(fitted[setting].to(_device_of(model, target_name)))
        log.info("transfer %s: prefix %s starts from the base's %s", runtime.name, target_name, setting)
        return TransferChoice(setting, setting)
    fitted, skipped = candidates(model, target_name, base_prefixes)
    for name, why in skipped.items():
        log.info("transfer %s: candidate %s skipped: %s", runtime.name, name, why)
    scores = scorer({FRESH: None, **fitted})
    chosen = min(scores, key=scores.get)  # ties: the first, a fresh start
    if chosen != FRESH:
        model.prefix_bank.encoders[target_name].set_initial(fitted[chosen].to(_device_of(model, target_name)))
    log.info("transfer %s: auto chose %s (held-back training loss %.4f; candidates: %s)", runtime.name, chosen,
             scores[chosen], ", ".join(f"{n} {s:.4f}" for n, s in scores.items()))
    return TransferChoice(setting, chosen, scores, skipped)


def _device_of(model: MultiTaskModel, name: str) -> torch.device:
    return model.prefix_bank.encoders[name].embedding.device


@torch.no_grad()
def mean_mixing_weights(model: MultiTaskModel, runtime, target_name: str, split: str, pad_id: int,
                        device: torch.device) -> dict[str, float]:
    """The mixture's mean weight on each source (and on "no source") over a split's inputs."""
    mixture = model.prefix_bank.mixtures[target_name]
    features = runtime.features[split]
    total = None
    for start in range(0, len(features), 256):
        batch = runtime.task.collate(features[start : start + 256], pad_id)
        summary = input_summary(model.encoder.get_input_embeddings(), batch.input_ids.to(device),
                                batch.attention_mask.to(device))
        weights = mixture.weights(summary).sum(dim=0)
        total = weights if total is None else total + weights
    names = ["no source", *mixture.sources]
    return {name: round(float(value) / max(len(features), 1), 4) for name, value in zip(names, total.tolist())}
