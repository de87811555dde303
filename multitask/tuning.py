"""Training defaults per task type, and their resolution against the task files and the experiment.

Prefix tuning is sensitive to its settings, and the good ones differ by task type (DESIGN.md §6; docs/tuning.md
has the sweep that chose them). Each setting is taken, in order, from the task file (``prefix:`` / ``head:`` sections,
or an experiment's per-task ``overrides``), the experiment (a value there applies to every task), or the task type's
:class:`TuningDefaults`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)
# Head learning rate of the other methods (LoRA, full fine-tuning, linear probe) when the experiment sets none.
NON_PREFIX_HEAD_LR = 1e-3
# Methods whose heads read a frozen encoder steered by trained virtual tokens: the task types' head defaults hold.
PROMPTED_METHODS = ("prefix", "prompt")


@dataclass(frozen=True)
class TuningDefaults:
    """What a task type trains best with when nobody says otherwise."""

    prefix_length: int = 16
    reparameterize: bool = False
    prefix_dropout: float = 0.0
    prefix_lr: float = 2e-2
    head_lr: float = 2e-2
    warmup_ratio: float = 0.06
    prefix_attention: str = "joint"  # PrefixBankConfig.attention


@dataclass(frozen=True)
class TaskTuning:
    """One task's resolved settings, and where each came from ("experiment", "task file" or "<type> default")."""

    task: str
    prefix_length: int
    reparameterize: bool
    prefix_dropout: float
    prefix_lr: float
    head_lr: float
    warmup_ratio: float
    prefix_attention: str
    sources: dict[str, str]

    def describe(self) -> str:
        values = ", ".join(f"{key} {getattr(self, key)} ({source})" for key, source in self.sources.items())
        return f"task {self.task}: {values}"


def _first(candidates: list[tuple[object, str]]) -> tuple[object, str]:
    return next((value, source) for value, source in candidates if value is not None)


def resolve_task_tuning(experiment, task) -> TaskTuning:
    """Settings of one task (a :class:`~multitask.tasks.base.TaskType`) in ``experiment``."""
    defaults: TuningDefaults = task.tuning_defaults
    default_source = f"{task.config.type} default"
    prefix, optimization = experiment.prefix.prefix, experiment.optimization
    prompted = experiment.method in PROMPTED_METHODS
    head_default = defaults.head_lr if prompted else NON_PREFIX_HEAD_LR
    choices = {
        "prefix_length": [(task.config.prefix.length, "task file"), (prefix.length, "experiment"),
                          (defaults.prefix_length, default_source)],
        "reparameterize": [(task.config.prefix.reparameterize, "task file"), (prefix.reparameterize, "experiment"),
                           (defaults.reparameterize, default_source)],
        "prefix_dropout": [(task.config.prefix.dropout, "task file"), (prefix.dropout, "experiment"),
                           (defaults.prefix_dropout, default_source)],
        "prefix_lr": [(task.config.prefix.lr, "task file"), (optimization.prefix_lr, "experiment"),
                      (defaults.prefix_lr, default_source)],
        "head_lr": [(task.config.head.lr, "task file"), (optimization.head_lr, "experiment"),
                    (head_default, default_source if prompted else f"{experiment.method} default")],
        "warmup_ratio": [(optimization.warmup_ratio, "experiment"), (defaults.warmup_ratio, default_source)],
        "prefix_attention": [(task.config.prefix.attention, "task file"), (experiment.prefix.attention, "experiment"),
                             (defaults.prefix_attention, default_source)],
    }
    resolved = {key: _first(candidates) for key, candidates in choices.items()}
    return TaskTuning(task=task.config.name, **{k: v for k, (v, _) in resolved.items()},
                      sources={k: source for k, (_, source) in resolved.items()})


def resolve_tuning(experiment, tasks: list) -> dict[str, TaskTuning]:
    return {task.config.name: resolve_task_tuning(experiment, task) for task in tasks}


def run_warmup_ratio(tunings: dict[str, TaskTuning]) -> float:
    """One schedule serves every task: the longest warm-up any task asks for."""
    return max(t.warmup_ratio for t in tunings.values())


def log_tuning(tunings: dict[str, TaskTuning]) -> None:
    for tuning in tunings.values():
        log.info("settings applied: %s", tuning.describe())
