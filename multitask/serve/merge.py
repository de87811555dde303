"""One model over every served run: all their prefixes in one bank and all their heads in one table, on the one
encoder they share, so a micro-batch takes one encoder pass whatever mix of tasks and runs it holds.

A run is a set of trained prefixes and heads over a frozen encoder. Runs trained on the same encoder differ only
in those, and a prefix bank already serves tasks with prefixes of different lengths, layers and attention in one
batch. So the server renames each run's prefixes and tasks into its own namespace (``run/name``) and assembles them
into one model, reusing the very modules each run loaded: assembling costs a few dictionaries, however many tasks,
and the run's predictions are unchanged.
"""

from __future__ import annotations

from typing import Iterable

from multitask.inference import InferenceEngine
from multitask.model import MultiTaskModel
from multitask.prefix.bank import PrefixLayout
from multitask.run import TrainedRun

SEPARATOR = "/"


def qualified(run_name: str, name: str) -> str:
    return f"{run_name}{SEPARATOR}{name}"


def merged_layout(runs: dict[str, TrainedRun]) -> PrefixLayout | None:
    """The runs' prefix layouts side by side, every prefix and task renamed ``run/name``; a run without prefixes
    (linear probe) gives its tasks none. None when no run has a prefix."""
    prefixes, task_prefixes, attention, mixtures = {}, {}, {}, {}
    for run_name, run in runs.items():
        bank = run.model.prefix_bank
        if bank is None:
            task_prefixes.update({qualified(run_name, task): () for task in run.model.task_names})
            continue
        layout = bank.layout
        prefixes.update({qualified(run_name, n): c for n, c in layout.prefixes.items()})
        task_prefixes.update({qualified(run_name, t): tuple(qualified(run_name, n) for n in names)
                              for t, names in layout.task_prefixes.items()})
        attention.update({qualified(run_name, n): layout.attention_of(n) for n in layout.prefixes})
        mixtures.update({qualified(run_name, n): sources for n, sources in layout.mixtures.items()})
    if not prefixes:
        return None
    return PrefixLayout(prefixes, task_prefixes, attention, mixtures)


def _modules(runs: dict[str, TrainedRun], attribute: str) -> dict:
    return {qualified(run_name, name): module for run_name, run in runs.items() if run.model.prefix_bank is not None
            for name, module in getattr(run.model.prefix_bank, attribute).items()}


def merged_engine(runs: dict[str, TrainedRun]) -> InferenceEngine:
    """An engine over every task of ``runs`` (named ``run/task``), one model pass for any mix of them. The runs
    must share one encoder object (:func:`multitask.serve.catalog.load_catalog` loads them so; a LoRA or fully
    fine-tuned run, whose encoder is its own, is served alone)."""
    first = next(iter(runs.values()))
    encoder = first.model.encoder
    if any(run.model.encoder is not encoder for run in runs.values()):
        raise ValueError("runs merged into one model must share one encoder object")
    heads = {qualified(run_name, task): head for run_name, run in runs.items() for task, head in run.model.heads.items()}
    layout = merged_layout(runs)
    modules = (_modules(runs, "encoders"), _modules(runs, "mixtures")) if layout is not None else None
    # Inference only: the encoder is left as the runs have it (frozen, or a served LoRA run's own).
    model = MultiTaskModel(encoder, heads, layout, freeze_encoder=False, prefix_modules=modules).eval()
    tasks = {qualified(run_name, task): kind for run_name, run in runs.items() for task, kind in run.tasks.items()}
    engine = first.engine
    return InferenceEngine(model, first.tokenizer, tasks, engine.device, engine.precision, engine.batch_size)


def task_names(runs: dict[str, TrainedRun]) -> Iterable[tuple[str, str, str]]:
    """(qualified name, run name, task name) of every task of ``runs``."""
    for run_name, run in runs.items():
        for task in run.tasks:
            yield qualified(run_name, task), run_name, task
