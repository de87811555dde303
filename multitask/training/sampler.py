"""Task samplers: which task the next multi-task training step draws its batch from.

Every sampler is seeded and can save and restore its state, so a resumed run follows exactly the
task sequence the uninterrupted run would have followed. States are plain JSON-serialisable dicts.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np

from multitask.errors import CheckpointError, ConfigError, DataError
from multitask.registry import Registry


class TaskSampler:
    """Common interface; subclasses set ``name`` and either override ``next_task`` or provide weights."""

    name = ""

    def __init__(self, task_sizes: dict[str, int], seed: int) -> None:
        if not task_sizes:
            raise ConfigError("task sampler needs at least one task")
        for task, size in task_sizes.items():
            if size <= 0:
                raise DataError(f"task {task!r} has no training examples")
        self.tasks = list(task_sizes)
        self.task_sizes = dict(task_sizes)
        self.seed = seed

    def next_task(self) -> str:
        raise NotImplementedError

    def probabilities(self) -> dict[str, float]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.name, "tasks": list(self.tasks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Refuse a state from another sampler or task list: continuing it would silently change the schedule."""
        if state.get("sampler") != self.name or list(state.get("tasks", [])) != self.tasks:
            raise CheckpointError(
                f"saved sampler state is for {state.get('sampler')!r} over tasks {state.get('tasks')}, "
                f"not {self.name!r} over {self.tasks}"
            )


class RoundRobinSampler(TaskSampler):
    """Cycles through the tasks in the given order; deterministic, so the seed is unused."""

    name = "round_robin"

    def __init__(self, task_sizes: dict[str, int], seed: int) -> None:
        super().__init__(task_sizes, seed)
        self._position = 0

    def next_task(self) -> str:
        task = self.tasks[self._position % len(self.tasks)]
        self._position += 1
        return task

    def probabilities(self) -> dict[str, float]:
        """Long-run share of steps: uniform."""
        return {task: 1.0 / len(self.tasks) for task in self.tasks}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "position": self._position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._position = int(state["position"])


class WeightedRandomSampler(TaskSampler):
    """Draws tasks independently with fixed probabilities from a PCG64 generator."""

    def __init__(self, task_sizes: dict[str, int], seed: int, weights: dict[str, float]) -> None:
        super().__init__(task_sizes, seed)
        total = sum(weights[task] for task in self.tasks)
        self._probabilities = {task: weights[task] / total for task in self.tasks}
        # Inverse-CDF sampling from one uniform draw keeps the stream a pure function of the generator state.
        self._cumulative = np.cumsum([self._probabilities[task] for task in self.tasks])
        self._rng = np.random.Generator(np.random.PCG64(seed))

    def next_task(self) -> str:
        index = int(np.searchsorted(self._cumulative, self._rng.random() * self._cumulative[-1], side="right"))
        return self.tasks[min(index, len(self.tasks) - 1)]

    def probabilities(self) -> dict[str, float]:
        return dict(self._probabilities)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rng": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._rng.bit_generator.state = state["rng"]


class ProportionalSampler(WeightedRandomSampler):
    """p_i ∝ n_i: every example is seen about equally often, so large tasks dominate."""

    name = "proportional"

    def __init__(self, task_sizes: dict[str, int], seed: int) -> None:
        super().__init__(task_sizes, seed, weights={task: float(size) for task, size in task_sizes.items()})


class TemperatureSampler(WeightedRandomSampler):
    """p_i ∝ n_i^(1/T): T=1 is proportional, larger T moves towards uniform to protect small tasks."""

    name = "temperature"

    def __init__(self, task_sizes: dict[str, int], seed: int, temperature: float = 2.0) -> None:
        if not temperature > 0:
            raise ConfigError(f"sampler temperature must be > 0, got {temperature}")
        weights = {task: float(size) ** (1.0 / temperature) for task, size in task_sizes.items()}
        super().__init__(task_sizes, seed, weights=weights)


class ExplicitWeightsSampler(WeightedRandomSampler):
    """p_i ∝ the user's weight for task i; every task must be named, so a typo cannot drop a task."""

    name = "weights"

    def __init__(self, task_sizes: dict[str, int], seed: int, weights: dict[str, float]) -> None:
        missing = [task for task in task_sizes if task not in weights]
        unknown = [task for task in weights if task not in task_sizes]
        if missing or unknown:
            raise ConfigError(f"sampler weights: missing tasks {missing}, unknown tasks {unknown}")
        invalid = {
            task: w for task, w in weights.items() if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0
        }
        if invalid:
            raise ConfigError(f"sampler weights must be numbers >= 0, got {invalid}")
        if sum(weights.values()) <= 0:
            raise ConfigError("sampler weights must not all be zero")
        super().__init__(task_sizes, seed, weights={task: float(w) for task, w in weights.items()})


SAMPLERS: Registry[type[TaskSampler]] = Registry("sampler")
for _sampler in (RoundRobinSampler, ProportionalSampler, TemperatureSampler, ExplicitWeightsSampler):
    SAMPLERS.register(_sampler.name, _sampler)

DEFAULT_SAMPLER = RoundRobinSampler.name


def make_sampler(name: str, task_sizes: dict[str, int], seed: int, **options: Any) -> TaskSampler:
    """Build a registered sampler; options it does not take are a ConfigError, not a TypeError."""
    cls = SAMPLERS.get(name)
    parameters = inspect.signature(cls.__init__).parameters
    accepted = {key: p for key, p in parameters.items() if key not in ("self", "task_sizes", "seed")}
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(
            f"sampler {name!r} does not take option(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(sorted(accepted)) or '(none)'}"
        )
    required = sorted(key for key, p in accepted.items() if p.default is p.empty and key not in options)
    if required:
        raise ConfigError(f"sampler {name!r} needs option(s) {', '.join(required)}")
    return cls(task_sizes, seed, **options)
