"""Batches of example indices: an endless, resumable, shuffled stream per task for training, and
fixed length-sorted batches for evaluation. Index lists only (no model), beside the data they batch, so training
and the inference engine share them."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from multitask.errors import CheckpointError

# Length grouping sorts within windows of this many batches: wide enough to cut padding, narrow
# enough that batch contents still vary between epochs.
GROUPING_WINDOW_BATCHES = 50


def _task_entropy(task: str) -> int:
    """A stable integer for the task name (``hash()`` is salted per process, so unusable for seeding)."""
    return int.from_bytes(hashlib.sha256(task.encode("utf-8")).digest()[:8], "little")


def _split(indices: list[int], batch_size: int) -> list[list[int]]:
    return [indices[start : start + batch_size] for start in range(0, len(indices), batch_size)]


class TaskBatchStream:
    """Yields batches of example indices for one task forever, reshuffling at each pass over the data.

    The order of pass ``e`` depends only on ``(seed, task, e)``, so the state is just the pass
    number and the position within it. With ``length_grouped`` the batches hold examples of similar
    length (less padding) while the order of the batches stays random. The last partial batch of a
    pass is kept, so every example is seen exactly once per pass.
    """

    def __init__(
        self,
        task: str,
        num_examples: int,
        batch_size: int,
        seed: int,
        *,
        length_grouped: bool = False,
        lengths: list[int] | None = None,
        group_spread: int = 1,
    ) -> None:
        if num_examples <= 0:
            raise ValueError(f"task {task!r}: no examples to batch")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if group_spread < 1:
            raise ValueError(f"group_spread must be >= 1, got {group_spread}")
        if length_grouped and lengths is None:
            raise ValueError("length_grouped batching needs the example lengths")
        if lengths is not None and len(lengths) != num_examples:
            raise ValueError(f"task {task!r}: {len(lengths)} lengths for {num_examples} examples")
        self.task = task
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.length_grouped = length_grouped
        self.group_spread = group_spread
        self._lengths = np.asarray(lengths) if lengths is not None else None
        self._epoch = 0
        self._position = 0
        self._batches = self._plan(0)

    @property
    def epoch(self) -> int:
        """Number of completed passes over the data."""
        return self._epoch

    def _plan(self, epoch: int) -> list[list[int]]:
        seed_sequence = np.random.SeedSequence([self.seed, _task_entropy(self.task), epoch])
        rng = np.random.Generator(np.random.PCG64(seed_sequence))
        order = rng.permutation(self.num_examples)
        if not self.length_grouped:
            return _split(order.tolist(), self.batch_size)
        window = self.batch_size * GROUPING_WINDOW_BATCHES
        batches: list[list[int]] = []
        for start in range(0, self.num_examples, window):
            chunk = order[start : start + window]
            chunk = chunk[np.argsort(self._lengths[chunk], kind="stable")]
            # Shuffling within runs of `group_spread` sorted batches keeps lengths close (little padding) while a
            # batch no longer holds only near-identical inputs (e.g. all of a corpus's two-token headlines).
            spread = self.batch_size * self.group_spread
            if self.group_spread > 1:
                chunk = np.concatenate([rng.permutation(chunk[s : s + spread]) for s in range(0, len(chunk), spread)])
            batches.extend(_split(chunk.tolist(), self.batch_size))
        return [batches[i] for i in rng.permutation(len(batches))]

    def next_batch(self) -> list[int]:
        batch = self._batches[self._position]
        self._position += 1
        if self._position == len(self._batches):
            self._epoch += 1
            self._position = 0
            self._batches = self._plan(self._epoch)
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {**self._identity(), "epoch": self._epoch, "position": self._position}

    def _identity(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "num_examples": self.num_examples,
            "batch_size": self.batch_size,
            "length_grouped": self.length_grouped,
            "group_spread": self.group_spread,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Refuse a state saved under another task, data size or batching: its replayed passes would differ."""
        saved = {key: state.get(key, 1 if key == "group_spread" else None) for key in self._identity()}
        if saved != self._identity():
            raise CheckpointError(f"saved batch stream {saved} does not match this one {self._identity()}")
        self._epoch = int(state["epoch"])
        self._position = int(state["position"])
        self._batches = self._plan(self._epoch)


def eval_batches(lengths: list[int], batch_size: int, min_fill: float = 0.0) -> list[list[int]]:
    """Deterministic batches sorted by length, longest first, so padding is minimal and an
    out-of-memory batch shows up at the start rather than at the end. Covers every index once.

    ``min_fill``: also start a new batch where an input is shorter than this share of its batch's longest, so
    inputs of very different lengths (a mixed-task batch: sentences beside QA windows) are not padded to the
    longest; 0 cuts by count only."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda index: (-lengths[index], index))
    if min_fill <= 0:
        return _split(order, batch_size)
    batches: list[list[int]] = []
    for index in order:
        if batches and len(batches[-1]) < batch_size and lengths[index] >= min_fill * lengths[batches[-1][0]]:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches
