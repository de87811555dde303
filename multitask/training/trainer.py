"""Joint multi-task training: sampler -> batches -> prefix/head updates, periodic evaluation, checkpoints, reports."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from multitask import parallel
from multitask.backbone import enable_activation_checkpointing, encoder_fingerprint, load_encoder
from multitask.checkpoint import save_checkpoint
from multitask.config import to_dict
from multitask.data.batching import TaskBatchStream
from multitask.device import autocast, cast_frozen_encoder, describe_device, enable_tf32, resolve_device
from multitask.errors import CheckpointError, ConfigError
from multitask.experiment import ExperimentConfig
from multitask.inference import InferenceEngine
from multitask.model import ModelInputs, MultiTaskModel
from multitask.precision import resolve_precision
from multitask.prefix.initialization import initialize_prefixes
from multitask.prompt.initialization import initialize_prompts
from multitask.reporting import RunReport, TaskReport, write_reports
from multitask.runtime import TaskRuntime, build_model, load_tokenizer, prepare_tasks
from multitask.training.averaging import WeightAverage
from multitask.training.balance import SharedGradientBalancer
from multitask.training.evaluation import BestSoFar, evaluate_tasks, record_scores, selection_score
from multitask.training.frozen_cache import open_frozen_cache, with_cached_states
from multitask.training.grow import (
    build_grown_model, check_base_unchanged, check_new_tasks, grown_tasks_meta, load_base, new_prefix_name,
    on_base_encoder, start_new_prefixes, transfer_report,
)
from multitask.training.init_from import freeze_prefixes, init_encoder_from_run, init_from_run
from multitask.training.optim import ProgressSchedule, build_optimizer
from multitask.training.sampler import make_sampler
from multitask.training.state import load_training_state, save_training_state, trainable_state
from multitask.tuning import log_tuning, resolve_tuning, run_warmup_ratio
from multitask.utils.atomic import ensure_writable, remove_stale_temporaries, write_json, write_jsonl
from multitask.utils.memory import rss_bytes
from multitask.utils.readback import read_json_file
from multitask.utils.rng import restore_rng_state, rng_state, seed_everything

log = logging.getLogger(__name__)
LOSS_WINDOW = 10
# Training inputs per task whose token counts pick the frequent tokens that initialise prefixes.
INIT_SAMPLE_FEATURES = 20000


def init_sequences(tasks: list[TaskRuntime]) -> dict[str, list[list[int]]]:
    """Each task's training inputs that initialisation draws frequent tokens from."""
    return {t.name: [f.input_ids for f in t.features["train"][:INIT_SAMPLE_FEATURES]] for t in tasks}


# Warm-up share of the first step under a time budget, where the number of steps is not known in advance.
TIME_BUDGET_FIRST_STEP = 1e-3


@dataclass
class History:
    loss: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    metric: dict[str, list[tuple[int, str, float]]] = field(default_factory=dict)
    pending_loss: dict[str, list[float]] = field(default_factory=dict)
    eval_minutes: dict[int, float] = field(default_factory=dict)  # evaluated step -> training minutes so far

    def add_loss(self, task: str, step: int, value: float) -> None:
        window = self.pending_loss.setdefault(task, [])
        window.append(value)
        if len(window) == LOSS_WINDOW:
            self.loss.setdefault(task, []).append((step, sum(window) / len(window)))
            window.clear()


def differing_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the config keys whose values differ (lists of the same length item by item)."""
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        old, new = dict(enumerate(old)), dict(enumerate(new))
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [] if old == new else [prefix or "(the whole config)"]
    paths = []
    for key in sorted(set(old) | set(new), key=str):
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in old or key not in new:
            paths.append(path)
        else:
            paths.extend(differing_keys(old[key], new[key], path))
    return paths


def total_steps(
    experiment: ExperimentConfig, tasks: list[TaskRuntime], replicas: int, probabilities: dict[str, float]
) -> float:
    """max_steps, or enough steps for ``epochs`` passes over the largest task's training set (global batches of
    ``replicas`` per-rank batches) given the share of steps the sampler gives that task (``probabilities``: a
    round robin over 3 tasks gives it a third); unbounded (inf) when only a time budget is set."""
    optimization = experiment.optimization
    if optimization.max_steps is not None:
        return optimization.max_steps
    if optimization.epochs is None:
        return math.inf
    largest = max(tasks, key=lambda t: len(t.features["train"]))
    batches = math.ceil(len(largest.features["train"]) / (largest.batch_size * replicas))
    # Each optimiser step takes grad_accumulation batches of its task.
    steps = optimization.epochs * batches / (probabilities[largest.name] * optimization.grad_accumulation)
    return max(1, math.ceil(steps))


def mean_terms_per_batch(tasks: list[TaskRuntime], replicas: int, pad_id: int) -> dict[str, float]:
    """Average loss terms (rows, or labelled tokens for NER) in a global batch of each task, from its training set."""
    means = {}
    for runtime in tasks:
        features = runtime.features["train"]
        terms = sum(runtime.task.loss_terms(runtime.task.collate(features[i : i + 512], pad_id).targets)
                    for i in range(0, len(features), 512))
        means[runtime.name] = max(terms, 1) / len(features) * runtime.batch_size * replicas
    return means


class _NoWriter:
    """TensorBoard's stand-in on ranks other than 0, which write no files."""

    def add_scalar(self, *args: Any) -> None:
        pass

    def close(self) -> None:
        pass


class Trainer:
    """Trains one joint model for an experiment and writes its run directory.

    ``encoder`` / ``tokenizer`` may be given directly (tests use tiny in-process ones); otherwise they are
    loaded from the experiment's encoder name. ``on_step`` is called after every optimiser step.
    Under torchrun it trains data-parallel (see ``multitask.parallel``): every rank builds the same
    Trainer, rank 0 alone writes the run directory, and ``train`` returns the report on rank 0 only.
    """

    def __init__(
        self, experiment: ExperimentConfig, run_dir: Path, config_path: Path | None = None, resume: bool = False,
        encoder=None, tokenizer=None, progress: bool = True, on_step: Callable[[int], None] | None = None,
    ) -> None:
        if experiment.base:  # checked against the base first; its encoder is the run's
            experiment = on_base_encoder(experiment, config_path)
        self.experiment, self.run_dir, self.resume = experiment, Path(run_dir), resume
        self.progress, self.on_step = progress, on_step
        preparation_started = time.perf_counter()
        self._check_run_dir()
        saved = load_training_state(self.run_dir) if resume else None
        if resume and saved is None:  # killed before its first save: nothing to continue, so start afresh
            log.info("%s: no saved state yet; starting the run from the beginning", self.run_dir)
        if experiment.num_threads:
            torch.set_num_threads(experiment.num_threads)
        seed_everything(experiment.seed)
        self.device = parallel.init_process_group(resolve_device(experiment.device))
        # A global batch is `replicas` per-rank batches: the world size the run started with, kept on resume, so
        # a run continues on any number of processes along the same batches and schedule.
        self.replicas: int = saved["replicas"] if saved else parallel.world_size()
        self.tokenizer = tokenizer or load_tokenizer(experiment.encoder.name)
        with parallel.main_rank_first():
            self.tasks = prepare_tasks(experiment, config_path, self.tokenizer)
        for runtime in self.tasks:
            if not runtime.features.get("train"):
                raise ConfigError(f"task {runtime.name!r} has no training data")
        self.tunings = resolve_tuning(experiment, [t.task for t in self.tasks])
        log_tuning(self.tunings)
        self.base = load_base(experiment, config_path, encoder) if experiment.base else None
        if self.base is not None:
            check_new_tasks(self.base, [t.task for t in self.tasks], str(config_path or "<config>"))
            check_base_unchanged(self.base, saved, self.run_dir)
            self.encoder_identity = dict(self.base.meta["encoder"])
            seed_everything(experiment.seed)
            self.model: MultiTaskModel = build_grown_model(self.base, experiment, [t.task for t in self.tasks],
                                                           self.tunings).to(self.device)
        else:
            encoder = encoder if encoder is not None else load_encoder(
                experiment.encoder.name, experiment.encoder.attention,
                with_pooler=any(t.task.config.head.pooling == "pooler" for t in self.tasks))
            self.encoder_identity = {"name": experiment.encoder.name, "fingerprint": encoder_fingerprint(encoder)}
            seed_everything(experiment.seed)
            self.model = build_model(experiment, [t.task for t in self.tasks], encoder, self.tunings).to(self.device)
        if experiment.encoder.init_from and saved is None:  # a resumed run's saved encoder replaces it
            init_encoder_from_run(self.model.encoder, experiment.encoder.init_from, experiment)
        self.precision, self.precision_reason = resolve_precision(experiment.precision, self.device)
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.prefix_similarity: dict[str, float] = {}
        self.transfers: dict[str, dict[str, Any]] = saved.get("transfers", {}) if saved else {}
        if self.model.prefix_bank is not None and saved is None:  # a resumed run's saved prefixes replace it
            sequences = init_sequences(self.tasks)
            new_prefixes = None if self.base is None else [new_prefix_name(t.name) for t in self.tasks]
            self.prefix_similarity = initialize_prefixes(self.model.prefix_bank, self.model.encoder, self.tokenizer,
                                                         sequences, new_prefixes)
            if self.base is not None:
                self.transfers = start_new_prefixes(self.model, self.base, experiment, self.tasks, self.tunings,
                                                    self.tokenizer, self.device, self.precision, self.pad_id)
        if self.model.prompt_bank is not None and saved is None:
            sequences = init_sequences(self.tasks)
            self.prefix_similarity = initialize_prompts(self.model.prompt_bank, self.model.encoder, self.tokenizer,
                                                        sequences)
        if experiment.prefix.init_from and saved is None:
            init_from_run(self.model, experiment.prefix.init_from, self.encoder_identity["fingerprint"])
        freeze_prefixes(self.model, experiment.prefix.freeze)
        self.tf32 = enable_tf32(self.device) and self.precision == "fp32"
        self.encoder_dtype = cast_frozen_encoder(self.model, self.device, self.precision, experiment.method)
        log.info("device %s; precision %s (%s)%s%s", describe_device(self.device), self.precision,
                 self.precision_reason, "; TF32 matrix products" if self.tf32 else "",
                 f"; frozen encoder held in {self.encoder_dtype}" if self.encoder_dtype else "")
        if experiment.encoder.gradient_checkpointing:
            enable_activation_checkpointing(self.model.encoder)
        self.frozen_cache = open_frozen_cache(self.model, experiment, self.tasks, self.encoder_identity["fingerprint"],
                                              self.tokenizer, parallel.rank(), self.device)
        self.train_model = parallel.wrap(self.model, self.device)  # what training steps call; self.model elsewhere
        parallel.seed_rank(experiment.seed)
        sizes = {t.name: len(t.features["train"]) for t in self.tasks}
        self.sampler = make_sampler(experiment.sampler.name, sizes, experiment.seed, **experiment.sampler.options())
        self.total_steps = total_steps(experiment, self.tasks, self.replicas, self.sampler.probabilities())
        self.optimizer = build_optimizer(self.model, experiment.optimization, self.tunings)
        shared = self.model.prefix_bank.shared_parameters() \
            if experiment.optimization.balance_shared and self.model.prefix_bank is not None else []
        self.balancer = SharedGradientBalancer(shared, experiment.optimization.balance_strength) if shared else None
        first_step = 1.0 / self.total_steps if math.isfinite(self.total_steps) else TIME_BUDGET_FIRST_STEP
        self.scheduler = ProgressSchedule(self.optimizer, experiment.optimization, run_warmup_ratio(self.tunings),
                                          first_step)
        decay = experiment.optimization.ema_decay
        self.average = WeightAverage(self.model, decay) if decay is not None else None
        if self.average is not None:
            log.info("evaluating and saving a running average of the trained weights (ema_decay %g)", decay)
        self.scaler = torch.amp.GradScaler(enabled=self.precision == "fp16" and self.device.type == "cuda")
        # Mean loss terms per global batch of each task whose terms vary from batch to batch (NER: labelled tokens).
        self.mean_terms = mean_terms_per_batch(self.tasks, self.replicas, self.tokenizer.pad_token_id or 0) \
            if experiment.optimization.weight_by_terms else {}
        self.streams = {
            t.name: TaskBatchStream(
                t.name, len(t.features["train"]), t.batch_size * self.replicas, experiment.seed,
                length_grouped=experiment.optimization.length_grouped,
                group_spread=experiment.optimization.group_spread,
                lengths=[len(f) for f in t.features["train"]],
            )
            for t in self.tasks
        }
        self.step, self.best = 0, BestSoFar()
        self.history, self.elapsed, self.examples_seen = History(), 0.0, 0
        self.train_seconds, self.evaluation_seconds = 0.0, 0.0
        self.engine = InferenceEngine(self.model, self.tokenizer, {t.name: t.task for t in self.tasks}, self.device,
                                      self.precision, experiment.evaluation.batch_size, progress=progress)
        if saved is not None:
            self._restore(saved)
        self.preparation_seconds = time.perf_counter() - preparation_started

    # ------------------------------------------------------------------ run directory and state
    def _check_run_dir(self) -> None:
        has_run = (self.run_dir / "state").exists() or (self.run_dir / "checkpoint").exists()
        if has_run and not self.resume:
            raise CheckpointError(f"{self.run_dir} already holds a run; pass --resume to continue it, or choose "
                                  f"another --output-dir")
        resolved = to_dict(self.experiment)
        saved = self.run_dir / "config.json"
        if self.resume and saved.exists():
            previous = read_json_file(saved, "run config", hint="restore it, or start afresh in another --output-dir")
            current = json.loads(json.dumps(resolved))  # as it would read back from config.json
            if previous != current:
                changed = differing_keys(previous, current)
                raise CheckpointError(f"{self.run_dir}: the config differs from the run being resumed "
                                      f"(keys: {', '.join(changed)}); resume with the same config, or start a new "
                                      f"run in another --output-dir")
        if parallel.is_main():
            ensure_writable(self.run_dir)
            for stale in remove_stale_temporaries(self.run_dir):
                log.info("removed %s, left by a write that was interrupted", stale)
            write_json(saved, resolved)

    def _state(self) -> dict[str, Any]:
        """Everything --resume needs; rank-independent but for "rng", one state per rank (a collective call)."""
        return {
            "step": self.step, "model": trainable_state(self.model), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "sampler": self.sampler.state_dict(), "streams": {k: s.state_dict() for k, s in self.streams.items()},
            "rng": parallel.gather_from_all(rng_state(self.device)), "replicas": self.replicas,
            "best_score": self.best.score, "best_step": self.best.step,
            "best_state": self.best.state, "bad_evals": self.best.bad_evals, "history": self.history,
            "elapsed": self.wall_time(), "examples_seen": self.examples_seen,
            "train_seconds": self.train_seconds, "evaluation_seconds": self.evaluation_seconds,
            "prefix_init_cosine": self.prefix_similarity,
            "balancer": self.balancer.state_dict() if self.balancer is not None else None,
            "average": self.average.state_dict() if self.average is not None else None,
            "transfers": self.transfers,
            "base_checkpoint_sha256": self.base.meta.get("model_sha256") if self.base is not None else None,
        }

    def wall_time(self) -> float:
        """Training seconds across every resumed segment of this run."""
        return self.elapsed + (time.perf_counter() - self.started)

    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        for name, stream_state in state["streams"].items():
            self.streams[name].load_state_dict(stream_state)
        self._restore_rng(state["rng"])
        self.step = state["step"]
        self.best = BestSoFar(state["best_score"], state["best_step"], state["best_state"], state["bad_evals"])
        history = state["history"]  # saved as the dict of its fields (plain data, for weights_only loading)
        self.history = history if isinstance(history, History) else History(**history)
        self.elapsed = state["elapsed"]
        self.examples_seen = state["examples_seen"]
        # A time budget continues where the interrupted run stopped (states saved before budgets existed: 0).
        self.train_seconds = state.get("train_seconds", 0.0)
        self.evaluation_seconds = state.get("evaluation_seconds", 0.0)
        self.prefix_similarity = state.get("prefix_init_cosine", {})
        if self.balancer is not None and state.get("balancer"):
            self.balancer.load_state_dict(state["balancer"])
        if self.average is not None and state.get("average"):
            self.average.load_state_dict(state["average"])
        log.info("resumed %s at step %d", self.run_dir, self.step)

    def _restore_rng(self, states: list[dict[str, Any]]) -> None:
        """Each rank continues its own random stream (dropout); a rank the saved run did not have keeps the fresh
        one from ``seed_rank``, so a run resumed on another number of processes matches the uninterrupted one up to
        dropout (exactly, without dropout, up to float rounding)."""
        if len(states) != parallel.world_size():
            log.info("resuming a run saved by %d process(es) on %d; global batches stay %d per-rank batches",
                     len(states), parallel.world_size(), self.replicas)
        if parallel.rank() < len(states):
            restore_rng_state(states[parallel.rank()], self.device)

    def checkpoint_meta(self) -> dict[str, Any]:
        tasks = [{"config": to_dict(t.task.config), "labels": t.task.labels} for t in self.tasks]
        meta = {
            "encoder": self.encoder_identity,
            "method": self.experiment.method,
            "experiment": to_dict(self.experiment),
            "tasks": tasks if self.base is None else grown_tasks_meta(self.base, tasks),
            "step": self.step,
            "best_step": self.best.step,
        }
        if self.base is not None:
            meta["base"] = self.base.identity()
        return meta

    # ------------------------------------------------------------------ training
    def batch_loss(self, runtime: TaskRuntime, rows: list[int], batch: Any) -> torch.Tensor:
        """The mean training loss of one collated batch of a task's training inputs ``rows`` (through the frozen
        cache where it covers the task), in the run's precision."""
        inputs = ModelInputs.of_task(batch, self.model.task_id(runtime.name))
        if self.frozen_cache is not None and self.frozen_cache.covers(runtime.name):
            inputs = with_cached_states(self.frozen_cache, runtime, rows, inputs, self.pad_id, self.device,
                                        self.precision)
        with autocast(self.device, self.precision):
            logits, _ = self.train_model(inputs.to(self.device))[runtime.name]
            return runtime.task.loss(logits, batch.targets.to(self.device, non_blocking=True))

    def _global_terms(self, runtime: TaskRuntime, indices: list[int], local_terms: int) -> int:
        """The loss terms of the whole global batch: each rank collates it (rows of every rank) on the host, since
        loss terms add up over rows; asking the other ranks would wait for the device at every micro-batch."""
        if parallel.world_size() == 1:
            return local_terms
        batch = runtime.task.collate([runtime.features["train"][i] for i in indices], self.pad_id)
        return runtime.task.loss_terms(batch.targets)

    def train_step(self) -> tuple[str, torch.Tensor]:
        """One optimiser step on the sampled task; returns the task and the loss of its global batch(es), a tensor
        on the device (reading it back would make the host wait for the step: the loop reads losses in windows).

        Each rank trains on its rows of the global batch, its loss weighted by its share of the batch's loss terms
        (see ``parallel.loss_share``), so the step equals one process's step on the whole batch. With
        ``weight_by_terms`` a batch's loss also counts in proportion to its number of terms (NER: labelled tokens).
        """
        task_name = self.sampler.next_task()
        runtime = next(t for t in self.tasks if t.name == task_name)
        accumulation = self.experiment.optimization.grad_accumulation
        self.model.train()
        total = torch.zeros((), device=self.device)
        for micro in range(accumulation):
            indices = self.streams[task_name].next_batch()
            rows = parallel.rank_rows(indices)
            # A global batch smaller than the world leaves a rank without rows: it runs one row at weight 0, so
            # that it still joins DDP's all-reduce.
            taken = rows or indices[:1]
            batch = runtime.task.collate([runtime.features["train"][i] for i in taken], self.pad_id)
            local_terms = runtime.task.loss_terms(batch.targets) if rows else 0
            share, terms = parallel.loss_share(local_terms, self._global_terms(runtime, indices, local_terms))
            weight = terms / self.mean_terms[task_name] if task_name in self.mean_terms else 1.0
            with parallel.accumulation_context(self.train_model, sync=micro == accumulation - 1):
                loss = self.batch_loss(runtime, taken, batch)
                self.scaler.scale(loss * (share * parallel.world_size() * weight) / accumulation).backward()
            self.examples_seen += len(indices)
            total += loss.detach() * share / accumulation
        max_grad_norm = self.experiment.optimization.max_grad_norm
        if max_grad_norm is not None or self.balancer is not None:
            self.scaler.unscale_(self.optimizer)
        if self.balancer is not None:
            self.balancer(task_name)
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.trainable_parameters(), max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.average is not None:
            self.average.update()
        return task_name, parallel.all_reduce_sum(total)

    def evaluate_all(self, splits: list[str]) -> dict[str, dict[str, Any]]:
        """Every task on the given splits it has (see :func:`evaluate_tasks`; every rank must call it)."""
        return evaluate_tasks(self.engine, self.tasks, splits)

    def _evaluated_weights(self):
        """The weights evaluations and checkpoints see: the running average (ema_decay), else the trained ones."""
        return self.average.applied() if self.average is not None else nullcontext()

    def _periodic_evaluation(self, writer) -> bool:
        """Evaluate, keep the best checkpoint, and say whether early stopping should end training."""
        with self._evaluated_weights():
            return self._evaluate_and_keep_best(writer)

    def _evaluate_and_keep_best(self, writer) -> bool:
        started = time.perf_counter()
        results = self.evaluate_all(self.experiment.evaluation.splits)
        self.evaluation_seconds += time.perf_counter() - started
        self.history.eval_minutes[self.step] = round(self.train_seconds / 60.0, 4)
        selection_split = self.experiment.evaluation.splits[0]
        main_scores = record_scores(self.tasks, results, self.step, self.history.metric, writer, selection_split)
        score = parallel.broadcast_from_main(selection_score(self.tasks, results, selection_split))
        if self.best.judge(score, self.step, self.model) and parallel.is_main():
            save_checkpoint(self.run_dir, self.model, self.checkpoint_meta())
        log.info("step %d (%.1f training minutes): %s; mean main metric %s (best %.4f at step %s)", self.step,
                 self.train_seconds / 60, ", ".join(main_scores), score, self.best.score, self.best.step)
        patience = self.experiment.evaluation.early_stopping_patience
        return patience is not None and self.best.bad_evals >= patience

    def _open_writer(self) -> Any:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.run_dir / "tensorboard")) if parallel.is_main() else _NoWriter()

    def _save_state(self) -> None:
        state = self._state()  # on every rank: it gathers their random states
        if parallel.is_main():
            save_training_state(self.run_dir, state)

    def train(self) -> RunReport | None:
        self.started = time.perf_counter()
        log.info("%s", self.model.parameter_summary().render())
        if parallel.world_size() > 1:
            log.info("data parallel over %d processes: %s bytes of gradient all-reduced per step",
                     parallel.world_size(), f"{parallel.allreduce_bytes(self.model):,}")
        writer = self._open_writer()
        checkpoint_every = self.experiment.evaluation.checkpoint_every
        total = self.total_steps if math.isfinite(self.total_steps) else None
        # Into a log file (not a terminal) the bar is redrawn every 30 s instead of every step.
        bar = tqdm(total=total, initial=self.step, disable=not self.progress or not parallel.is_main(),
                   desc="train", unit="step", mininterval=0.1 if sys.stderr.isatty() else 30.0)
        stop = False
        unlogged: list[tuple[str, int, torch.Tensor]] = []  # losses still on the device: (task, step, loss)
        progress = self.progress_done()
        while not stop and progress < 1.0:
            self.scheduler.update(progress)
            seconds_before = self.train_seconds
            step_started = time.perf_counter()
            task, loss = self.train_step()
            unlogged.append((task, self.step + 1, loss))
            if self._read_losses_now(self.step + 1, len(unlogged)):  # inside the timing: the device's work counts
                self._log_losses(unlogged, writer, bar)
            self.train_seconds += time.perf_counter() - step_started
            self.step += 1
            bar.update(1)  # redraws at most once per mininterval
            progress = self.progress_done()
            done = progress >= 1.0
            evaluated = done or self._evaluation_due(seconds_before)
            if evaluated:
                stop = self._periodic_evaluation(writer)
            if evaluated or stop or (checkpoint_every and self.step % checkpoint_every == 0):
                self._save_state()
            if self.on_step is not None:
                self.on_step(self.step)
        self._log_losses(unlogged, writer, bar)  # a stop the clock could not foresee (early stopping)
        bar.close()
        writer.close()
        return self.finish()

    def _read_losses_now(self, step: int, unlogged: int) -> bool:
        """Whether the losses of the steps so far are read back from the device after ``step``: once a window of
        LOSS_WINDOW steps is full, and before anything that saves or judges them (an evaluation, a checkpoint of
        the state, the end). A clock that steers training (a time budget, evaluations by the minute) must time the
        device's work, not its queueing: then every step is read back."""
        optimization, evaluation = self.experiment.optimization, self.experiment.evaluation
        checkpoint_every = evaluation.checkpoint_every
        return (unlogged >= LOSS_WINDOW or optimization.max_minutes is not None or bool(evaluation.every_minutes)
                or bool(evaluation.every_steps and step % evaluation.every_steps == 0)
                or bool(checkpoint_every and step % checkpoint_every == 0) or step >= self.total_steps)

    def _log_losses(self, unlogged: list[tuple[str, int, torch.Tensor]], writer, bar) -> None:
        """The pending steps' losses into the history, TensorBoard and the progress bar, in one read-back."""
        if not unlogged:
            return
        values = torch.stack([loss for _, _, loss in unlogged]).tolist()
        for (task, step, _), value in zip(unlogged, values):
            self.history.add_loss(task, step, value)
            writer.add_scalar(f"train/loss/{task}", value, step)
        # No redraw of its own (tqdm's default would redraw here): the next update redraws, once per mininterval.
        bar.set_postfix(task=unlogged[-1][0], loss=f"{values[-1]:.4f}", minutes=f"{self.train_seconds / 60:.1f}",
                        refresh=False)
        unlogged.clear()

    def progress_done(self) -> float:
        """Fraction of training done: of the step budget, or of the time budget's training time (whichever is
        further). Rank 0's clock decides, so every rank stops at the same step."""
        fractions = [self.step / self.total_steps] if math.isfinite(self.total_steps) else []
        budget = self.experiment.optimization.max_minutes
        if budget is not None:
            fractions.append(self.train_seconds / (60.0 * budget))
        progress = min(1.0, max(fractions))
        # A step budget gives every rank the same fraction; only a clock needs rank 0's word (one broadcast a step).
        return parallel.broadcast_from_main(progress) if budget is not None else progress

    def _evaluation_due(self, seconds_before: float) -> bool:
        evaluation = self.experiment.evaluation
        if evaluation.every_steps and self.step % evaluation.every_steps == 0:
            return True
        if evaluation.every_minutes:
            period = 60.0 * evaluation.every_minutes
            return int(self.train_seconds // period) > int(seconds_before // period)
        return False

    def finish(self) -> RunReport | None:
        """Restore the best weights, evaluate every split, write predictions and the reports (rank 0; the other
        ranks only help evaluate and return None)."""
        if self.best.state is not None:
            self.model.load_state_dict(self.best.state, strict=False)
        elif self.average is not None:  # nothing evaluated: the weights evaluations would have seen
            self.average.copy_to_model()
        splits = sorted({s for t in self.tasks for s in t.features if s != "train"})
        results = self.evaluate_all(splits)
        if not parallel.is_main():
            return None
        parameters = self.model.parameter_summary()
        report = RunReport(tasks={}, meta={
            "run_name": self.experiment.name, "encoder": self.experiment.encoder.name,
            "method": self.experiment.method, "prefix_mode": self.experiment.prefix.mode,
            "steps": self.step, "best_step": self.best.step,
            "wall_time_s": round(self.wall_time(), 3),
            "train_time_s": round(self.train_seconds, 3),
            "evaluation_time_s": round(self.evaluation_seconds, 3),
            "preparation_time_s": round(self.preparation_seconds, 3),
            "evaluation_minutes": {str(step): minutes for step, minutes in self.history.eval_minutes.items()},
            "precision": self.precision, "precision_reason": self.precision_reason,
            "device": describe_device(self.device), "tf32": self.tf32, "frozen_encoder_dtype": self.encoder_dtype,
            "settings": {name: t.describe() for name, t in self.tunings.items()},
            "prefix_init_cosine": self.prefix_similarity,
            "parameters": parameters.render(),
            "trainable_parameters": parameters.trainable,
            "encoder_parameters": parameters.encoder,
            "train_examples_seen": self.examples_seen,
            "peak_rss_bytes": rss_bytes("VmHWM"),
            "frozen_cache": None if self.frozen_cache is None else self.frozen_cache.summary(),
            "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda"
            else None,
        })
        if self.base is not None:
            report.meta["base"] = self.base.identity()
            report.meta["transfer"] = transfer_report(self.model, self.tasks, self.transfers, splits, self.pad_id,
                                                       self.device)
        for runtime in self.tasks:
            task_results = results.get(runtime.name, {})
            for split, evaluation in task_results.items():
                write_jsonl(self.run_dir / "predictions" / f"{runtime.name}.{split}.jsonl", evaluation.predictions)
            report.tasks[runtime.name] = TaskReport(
                name=runtime.name, type=runtime.task.config.type, main_metric=runtime.task.main_metric(),
                splits={s: e.result for s, e in task_results.items() if e.result is not None},
                metric_history=self.history.metric.get(runtime.name, []),
                loss_history=self.history.loss.get(runtime.name, []),
            )
        write_reports(report, self.run_dir)
        return report
