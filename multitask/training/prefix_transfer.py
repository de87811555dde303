"""Start a new task's prefix from a trained model's prefixes (``prefix.transfer``), and choose one by measurement.

Which source prefix helps a new task is not predictable from names (DESIGN.md §6: a sentiment prefix started a
question-type classifier 21 points higher). ``auto`` therefore measures: each candidate (every
base prefix, and a fresh start) is scored on the task's training examples only, so the validation split stays a fair
estimate of the finished run. By default (``transfer_criterion: evidence``) without training: how well a linear head
on the features the candidate gives could explain the labels (:mod:`transfer_evidence`, LogME). Or by a trial, as SPoT
(Vu et al., 2022) chose source prompts: the new prefix and head train for a few steps on most of the examples and are
scored on the rest, by the task's main metric (ties broken by loss) or by loss alone; with little data one held-back
slice is a noisy judge, so ``transfer_folds`` scores on several disjoint slices and averages, and the held-back
examples are bootstrapped. By default a base prefix of the new task's own type wins where it is credible
(:func:`choose`).
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch

from multitask.device import autocast
from multitask.errors import ConfigError
from multitask.model import ModelInputs, MultiTaskModel
from multitask.prefix.adapt import adapt_key_values
from multitask.prefix.encoder import PrefixEncoder
from multitask.prefix.mixture import input_summary
from multitask.tasks.base import featurize_examples
from multitask.training.transfer_evidence import evidence_of, scored_examples
from multitask.training.trial_noise import HeldBackPredictions, resampled_metrics, share_above, share_at_least

log = logging.getLogger(__name__)
FRESH, MIXTURE = "none", "mixture"
# Candidates are scored on at least HELD_ENOUGH held-back training examples in all where the data allow: one slice of
# HELD_SHARE of the examples (at most HELD_MAX) from 500 examples on; below that, MAX_FOLDS disjoint slices as
# in cross-validation, each big enough to share the HELD_ENOUGH (at most half the examples, so each trial still trains
# on half). Two folds of 50 score every one of 100 examples once, as five of 20 do, at 40% of the trial steps.
HELD_SHARE, HELD_MAX = 0.2, 256
HELD_ENOUGH, MAX_FOLDS = 100, 2
# Examples are held back in runs of this many consecutive ones, so a document rarely straddles fit and held-back.
HELD_BLOCK = 10
# A candidate that scores at least the pick's metric in this share of the paired resamples makes the pick a coin toss.
COIN_TOSS = 0.2
# A candidate above a fresh start's metric in this share of the paired resamples clearly helps (prior: same_type).
CLEARLY = 1 - COIN_TOSS


@dataclass(frozen=True)
class TrialPlan:
    """How ``auto`` scores each candidate. ``criterion: evidence``: no training, the evidence of a linear head on the
    candidate's features (:mod:`transfer_evidence`). Otherwise a trial: ``steps`` optimiser steps on the fitting
    share of the training data, in each of ``folds`` disjoint held-back slices, then the held-back main metric
    (``criterion: metric``, ties broken by loss) or loss (``criterion: loss``), averaged over the folds.
    ``prior: same_type`` weighs the scores against the new task's type (:func:`choose`)."""

    steps: int
    folds: int | None = None  # None: enough folds to score on HELD_ENOUGH examples
    criterion: str = "evidence"
    prior: str = "same_type"


@dataclass(frozen=True)
class CandidateScore:
    """One candidate's held-back scores, averaged over the folds: the task's main metric (None when the criterion
    is loss) and the loss; with the metric, the shares of paired resamples of the held-back examples in which the
    candidate scored at least the best candidate's metric and above a fresh start's (:mod:`trial_noise`)."""

    metric: float | None
    loss: float
    matches_best: float | None = None
    beats_fresh: float | None = None
    evidence: float | None = None  # criterion evidence: the linear head's log evidence (transfer_evidence)

    def rank(self, criterion: str) -> tuple[float, ...]:
        """Larger is better."""
        if criterion == "evidence" and self.evidence is not None:
            return (self.evidence,)
        if criterion == "metric" and self.metric is not None:
            return (self.metric, -self.loss)
        return (-self.loss,)

    def describe(self) -> dict[str, float]:
        if self.evidence is not None:
            described = {"evidence": round(self.evidence, 6)}
        else:
            loss = round(self.loss, 6) if math.isfinite(self.loss) else None  # no held-back loss terms
            described = {"loss": loss, **({"metric": round(self.metric, 6)} if self.metric is not None else {})}
        shares = {"matches_best": self.matches_best, "beats_fresh": self.beats_fresh}
        return described | {key: round(value, 3) for key, value in shares.items() if value is not None}


@dataclass
class TransferChoice:
    """How one new task's prefix started: the setting, the source chosen, and (auto) every candidate's score."""

    setting: str
    source: str
    scores: dict[str, CandidateScore] = field(default_factory=dict)  # held-back scores per candidate (auto)
    skipped: dict[str, str] = field(default_factory=dict)  # candidates that could not fit, and why
    trial: dict[str, Any] = field(default_factory=dict)  # how auto scored them (TrialPlan, and the metric's name)

    def describe(self) -> dict[str, Any]:
        described = {"setting": self.setting, "source": self.source, "skipped": self.skipped}
        if self.scores:
            described.update(trial=self.trial, held_back={n: s.describe() for n, s in self.scores.items()})
        return described


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
class HeldOutFold:
    """One split of a task's training examples for scoring: examples to train on, examples to score on."""

    fit: list[int]
    held: list[int]


def held_out_folds(size: int, folds: int | None, seed: int) -> list[HeldOutFold]:
    """Disjoint held-back slices of ``size`` training examples (:func:`fold_count` of them, each
    :func:`held_size` examples, in runs of consecutive ones: :func:`blocked_order`), with the rest to train on.
    Folds split examples, not model inputs, so no window of a held-back example (QA) is trained on."""
    count = fold_count(size, folds)
    held = held_size(size, count)
    order = blocked_order(size, seed)
    slices = [order[k * held : (k + 1) * held] for k in range(count)]
    return [HeldOutFold(fit=sorted(set(order) - set(part)), held=sorted(part)) for part in slices]


def blocked_order(size: int, seed: int) -> list[int]:
    """The example indices in a seeded order that keeps runs of HELD_BLOCK consecutive examples together. Training
    files keep a document's sentences (a BC5CDR abstract) or a paragraph's questions (SQuAD) next to each other, and
    they share names: a held-back sentence whose abstract was trained on scores what the trial memorised, not how
    well the candidate transfers (on BC5CDR with 100 examples every candidate then scored alike)."""
    blocks = [list(range(start, min(start + HELD_BLOCK, size))) for start in range(0, size, HELD_BLOCK)]
    random.Random(seed).shuffle(blocks)
    return [index for block in blocks for index in block]


def fold_count(size: int, folds: int | None) -> int:
    """How many folds score the candidates: ``folds`` (None: 1 where HELD_SHARE of the examples reaches
    HELD_ENOUGH, else MAX_FOLDS), never more than fit disjointly."""
    if size < 2:
        raise ConfigError("prefix.transfer: auto needs at least 2 training examples (some to train each candidate "
                          "on, some to score it on)")
    wanted = folds if folds is not None else (1 if size * HELD_SHARE >= HELD_ENOUGH else MAX_FOLDS)
    return min(wanted, size // held_size(size, wanted))


def held_size(size: int, folds: int) -> int:
    """Examples held back per fold: HELD_SHARE of them, or more so that ``folds`` slices hold back HELD_ENOUGH in
    all; at most HELD_MAX, a ``folds``-th and half of the examples, at least one."""
    wanted = max(int(size * HELD_SHARE), math.ceil(HELD_ENOUGH / folds))
    return max(1, min(HELD_MAX, size // max(folds, 2), wanted))


def score_starts(
    model: MultiTaskModel, runtime, target_name: str, starts: dict[str, torch.Tensor | None],
    learning_rates: tuple[float, float], plan: TrialPlan, tokenizer, device: torch.device, precision: str,
    pad_id: int, seed: int,
) -> dict[str, CandidateScore]:
    """Each start's score as ``plan.criterion`` says: the evidence (untrained), or a trial's held-back score."""
    if plan.criterion == "evidence":
        return score_by_evidence(model, runtime, target_name, starts, device, precision, pad_id, seed)
    return score_candidates(model, runtime, target_name, starts, learning_rates, plan, tokenizer, device, precision,
                            pad_id, seed)


def score_candidates(
    model: MultiTaskModel, runtime, target_name: str, starts: dict[str, torch.Tensor | None],
    learning_rates: tuple[float, float], plan: TrialPlan, tokenizer, device: torch.device, precision: str,
    pad_id: int, seed: int,
) -> dict[str, CandidateScore]:
    """Each start's held-back scores after ``plan.steps`` AdamW steps on the new prefix and head, in every fold.

    Every candidate starts from the same head and the same random stream, so only its prefix differs; afterwards the
    prefix, head and torch's random stream are back as they were, so a run whose auto keeps the fresh start trains
    exactly as with ``transfer: none``."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return _score_candidates(model, runtime, target_name, starts, learning_rates, plan, tokenizer, device,
                                 precision, pad_id, seed)


def _score_candidates(model, runtime, target_name, starts, learning_rates, plan, tokenizer, device, precision, pad_id,
                      seed) -> dict[str, CandidateScore]:
    prefix, head = model.prefix_bank.encoders[target_name], model.heads[runtime.name]
    saved = {key: value.clone() for key, value in {**_prefixed(prefix, "p"), **_prefixed(head, "h")}.items()}
    folds = held_out_folds(len(runtime.examples["train"]), plan.folds, seed)
    task_id = model.task_id(runtime.name)
    rows_of = _rows_by_example(runtime.features["train"])
    # The held-back examples made into inputs as for evaluation once per fold, not once per candidate and fold.
    held_inputs = [_evaluation_inputs(runtime, fold.held, tokenizer) for fold in folds] \
        if plan.criterion == "metric" else [None] * len(folds)
    scores = {}
    predictions: dict[str, list[list]] = {}  # each candidate's held-back predictions, per fold
    try:
        for name, kv in starts.items():
            per_fold = []
            for fold, inputs in zip(folds, held_inputs):
                _load(prefix, head, saved)
                if kv is not None:
                    prefix.set_initial(kv.to(device))
                torch.manual_seed(seed)
                fit_rows = [row for example in fold.fit for row in rows_of.get(example, [])]
                if not fit_rows:
                    raise ConfigError(f"task {runtime.name}: prefix.transfer: auto: none of the training examples "
                                      f"outside a held-back slice gave a model input to train on")
                _fit(model, runtime, prefix, head, fit_rows, learning_rates, plan.steps, task_id, device, precision,
                     pad_id, seed)
                held_rows = [row for example in fold.held for row in rows_of.get(example, [])]
                loss = _held_loss(model, runtime, held_rows, task_id, device, precision, pad_id)
                metric = None
                if inputs is not None:
                    metric, predicted = _held_metric(model, runtime, *inputs, task_id, device, precision, pad_id)
                    predictions.setdefault(name, []).append(predicted)
                per_fold.append((metric, loss))
            scores[name] = CandidateScore(
                metric=None if plan.criterion != "metric" else sum(m for m, _ in per_fold) / len(per_fold),
                loss=sum(loss for _, loss in per_fold) / len(per_fold))
            log.info("transfer %s: candidate %s: %s after %d steps (%d fold%s)", runtime.name, name,
                     _words(scores[name], runtime.task.main_metric()), plan.steps, len(folds),
                     "" if len(folds) == 1 else "s")
    finally:
        _load(prefix, head, saved)
    if plan.criterion != "metric":
        return scores
    held = [HeldBackPredictions(inputs[0], {name: predictions[name][k] for name in scores})
            for k, inputs in enumerate(held_inputs)]
    return with_noise(scores, held, runtime.task, seed)


def with_noise(scores: dict[str, CandidateScore], held: list[HeldBackPredictions], task, seed: int
               ) -> dict[str, CandidateScore]:
    """``scores`` with each candidate's shares of paired resamples at least the best's and above a fresh start's."""
    main = task.main_metric()
    samples = resampled_metrics(held, lambda examples, predicted: task.score(examples, predicted).scores[main],
                                seed=seed)
    best = best_candidate(scores, "metric")
    return {name: replace(score, matches_best=share_at_least(samples[name], samples[best]),
                          beats_fresh=share_above(samples[name], samples[FRESH]) if FRESH in samples else None)
            for name, score in scores.items()}


def score_by_evidence(model: MultiTaskModel, runtime, target_name: str, starts: dict[str, torch.Tensor | None],
                      device: torch.device, precision: str, pad_id: int, seed: int) -> dict[str, CandidateScore]:
    """Each start's evidence on the training examples (no training: :mod:`transfer_evidence`)."""
    evidence = evidence_of(model, runtime, target_name, starts, device, precision, pad_id, seed)
    scores = {name: CandidateScore(metric=None, loss=math.nan, evidence=value) for name, value in evidence.items()}
    for name, score in scores.items():
        log.info("transfer %s: candidate %s: %s", runtime.name, name, _words(score, runtime.task.main_metric()))
    return scores


def _words(score: CandidateScore, metric: str) -> str:
    if score.evidence is not None:
        return f"evidence {score.evidence:.4f}"
    if score.metric is None:
        return f"held-back loss {score.loss:.4f}"
    return f"held-back {metric} {score.metric:.4f}, loss {score.loss:.4f}"


def _rows_by_example(features) -> dict[int, list[int]]:
    """The indices of the model inputs made from each training example."""
    rows: dict[int, list[int]] = {}
    for index, feature in enumerate(features):
        rows.setdefault(feature.example_index, []).append(index)
    return rows


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
    """The held-back inputs' loss, each loss term (row, or labelled token) counting alike (infinite without any:
    such a slice tells the candidates apart by the metric alone)."""
    if not rows:
        return float("inf")
    model.eval()
    total, terms = 0.0, 0
    for start in range(0, len(rows), runtime.batch_size):
        loss, count = _loss(model, runtime, rows[start : start + runtime.batch_size], task_id, device, precision,
                            pad_id)
        total += float(loss) * max(count, 1)
        terms += max(count, 1)
    return total / terms


def _evaluation_inputs(runtime, held: list[int], tokenizer) -> tuple[list, list]:
    """Held-back training examples and their inputs as evaluation makes them (whole examples, every window)."""
    examples = [runtime.examples["train"][i] for i in held]
    return examples, featurize_examples(runtime.task, examples, tokenizer, training=False)


@torch.no_grad()
def _held_metric(model, runtime, examples: list, features: list, task_id, device, precision, pad_id
                 ) -> tuple[float, list]:
    """The task's main metric on held-back training examples (``features``: theirs, made as for evaluation), and
    the predictions it scored."""
    model.eval()
    task = runtime.task
    logits = []
    for start in range(0, len(features), runtime.batch_size):
        part = features[start : start + runtime.batch_size]
        batch = task.collate(part, pad_id)
        with autocast(device, precision):
            output, _ = model(ModelInputs.of_task(batch, task_id).to(device))[runtime.name]
        output = output.float().cpu().numpy()
        logits += [row[: len(feature)] if row.ndim == 2 else row for row, feature in zip(output, part)]
    predicted = task.decode(examples, features, logits)
    return float(task.score(examples, predicted).scores[task.main_metric()]), predicted


def start_prefix(
    model: MultiTaskModel, runtime, target_name: str, setting: str, base_prefixes: list[str], plan: TrialPlan,
    scorer: Callable[[dict[str, torch.Tensor | None]], dict[str, CandidateScore]], same_type: Sequence[str] = (),
) -> TransferChoice:
    """Set the new prefix ``target_name`` as ``setting`` says (none, a base prefix name, or auto); ``same_type``: the
    base prefixes that serve only tasks of the new task's type."""
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
    best = best_candidate(scores, plan.criterion)
    chosen = choose(scores, plan, [name for name in same_type if name in fitted])
    if chosen != FRESH:
        model.prefix_bank.encoders[target_name].set_initial(fitted[chosen].to(_device_of(model, target_name)))
    metric = runtime.task.main_metric()
    judged = "evidence" if plan.criterion == "evidence" else f"held-back {metric}"
    log.info("transfer %s: auto chose %s (%s; candidates: %s)", runtime.name, chosen,
             _words(scores[chosen], metric), "; ".join(f"{n} {_words(s, metric)}" for n, s in scores.items()))
    rivals = close_rivals(scores, best)
    if chosen != best:
        log.info("transfer %s: auto took %s, a prefix of the base's %s tasks, over the best-scored %s: %s "
                 "(prefix.transfer_prior)", runtime.name, chosen, runtime.task.config.type, best,
                 _why_credible(scores, chosen, best, judged))
    elif rivals:
        log.warning("transfer %s: auto's pick %s is within noise: %s scored at least its %s in %s of "
                    "resamples of the training examples; if you know the related base task, name its prefix "
                    "(prefix.transfer)", runtime.name, chosen, ", ".join(rivals), judged,
                    ", ".join(f"{scores[n].matches_best:.0%}" for n in rivals))
    trial = {"criterion": plan.criterion, "metric": metric}
    if plan.criterion == "evidence":
        trial.update(examples=scored_examples(len(runtime.examples["train"])))
    else:
        trial.update(steps=plan.steps, folds=fold_count(len(runtime.examples["train"]), plan.folds))
    if plan.criterion != "loss":
        trial.update(within_noise=rivals, prior=plan.prior, same_type=list(same_type), trials_best=best)
    return TransferChoice(setting, chosen, scores, skipped, trial)


def choose(scores: dict[str, CandidateScore], plan: TrialPlan, same_type: Sequence[str]) -> str:
    """The best-scored candidate; with ``prior: same_type``, the best-ranked prefix of the new task's type instead
    where it is credible (:func:`_credible`). The source of the new task's type finished best at every target-seed
    of docs/growing.md's sweep, while 60-step trials ranked it first at 6 of 9 and the evidence at 10 of 11: both
    tell a helpful start from a harmful one better than they rank close sources."""
    best = best_candidate(scores, plan.criterion)
    if plan.prior != "same_type" or best in same_type:
        return best
    credible = [name for name in same_type if name in scores and _credible(scores, name)]
    return max(credible, key=lambda name: scores[name].rank(plan.criterion)) if credible else best


def _credible(scores: dict[str, CandidateScore], name: str) -> bool:
    """By the evidence (not resampled): the candidate scores above a fresh start. By a trial: the trials cannot tell
    it is worse than their best (it matched it in COIN_TOSS of the resamples or more), or it clearly beats a fresh
    start (in CLEARLY of them or more)."""
    score = scores[name]
    if score.evidence is not None:
        return FRESH in scores and score.evidence > scores[FRESH].evidence
    return score.matches_best is not None and (
        score.matches_best >= COIN_TOSS or (score.beats_fresh is not None and score.beats_fresh >= CLEARLY))


def _why_credible(scores: dict[str, CandidateScore], chosen: str, best: str, judged: str) -> str:
    score = scores[chosen]
    if score.evidence is not None:
        return f"its evidence {score.evidence:.4f} is above a fresh start's {scores[FRESH].evidence:.4f}"
    return (f"it scored at least {best}'s {judged} in {score.matches_best:.0%} of resamples and above a fresh "
            f"start's in {score.beats_fresh:.0%}")


def close_rivals(scores: dict[str, CandidateScore], best: str) -> list[str]:
    """The other candidates that scored at least the trials' best metric in COIN_TOSS or more of the paired
    resamples."""
    return [name for name, score in scores.items()
            if name != best and score.matches_best is not None and score.matches_best >= COIN_TOSS]


def best_candidate(scores: dict[str, CandidateScore], criterion: str) -> str:
    """The best-scored candidate; on a tie the first (a fresh start, which comes first)."""
    return max(scores, key=lambda name: scores[name].rank(criterion))


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
