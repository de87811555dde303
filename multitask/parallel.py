"""Data-parallel training under torchrun: the process group, ranks, batch slices, sharded evaluation, traffic.
Training and the inference engine (sharded evaluation) both use it, so it sits below both.

Every rank follows the same task schedule and draws the same global batch of the step's task (the sampler and
the batch streams are seeded alike and never look at the rank); rank r trains on its slice of that batch, and
DDP averages the gradients of the trainable parameters (prefixes and heads, or whatever the method trains;
frozen encoder weights never travel).
Without torchrun's environment (WORLD_SIZE unset or 1) no process group exists and every helper is a cheap no-op,
so one process runs exactly the code path it ran before data parallelism existed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from multitask.errors import ConfigError
from multitask.utils.rng import seed_everything

T = TypeVar("T")


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's rank; before the process group exists, torchrun's RANK (so the CLI can pick its logging)."""
    if dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if launched_by_torchrun() else 0


def is_main() -> bool:
    """Rank 0 alone writes files (checkpoints, state, logs, TensorBoard, reports) and computes metrics."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


# How long a rank may wait in a collective: rank 0 may tokenise or download for a long while before the others'
# barrier returns, and nccl's default (10 minutes) would kill the job. MULTITASK_DIST_TIMEOUT_MINUTES changes it.
DEFAULT_TIMEOUT_MINUTES = 120.0
_barrier_group: Any = None  # gloo, for the barriers around rank 0's work on nccl runs: waiting there holds no GPU


def process_group_timeout() -> timedelta:
    text = os.environ.get("MULTITASK_DIST_TIMEOUT_MINUTES", "")
    try:
        minutes = float(text) if text else DEFAULT_TIMEOUT_MINUTES
    except ValueError:
        raise ConfigError(f"MULTITASK_DIST_TIMEOUT_MINUTES={text!r}: expected a number of minutes") from None
    if minutes <= 0:
        raise ConfigError(f"MULTITASK_DIST_TIMEOUT_MINUTES={text!r}: expected a positive number of minutes")
    return timedelta(minutes=minutes)


def init_process_group(device: torch.device) -> torch.device:
    """Join torchrun's process group (nccl on CUDA, gloo on CPU) and return this rank's device: cuda:LOCAL_RANK
    on GPUs, so each process drives its own. A no-op that returns ``device`` outside torchrun."""
    global _barrier_group
    if not launched_by_torchrun():
        return device
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        visible = torch.cuda.device_count()
        if local >= visible:
            raise ConfigError(f"rank with LOCAL_RANK={local} has no GPU of its own: this machine shows {visible}; "
                              f"start at most {visible} processes per machine")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = process_group_timeout()
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
        if device.type == "cuda":
            _barrier_group = dist.new_group(backend="gloo", timeout=timeout)
    return device


def shutdown() -> None:
    global _barrier_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _barrier_group = None


def seed_rank(seed: int) -> None:
    """Give ranks > 0 their own random stream, so their dropout masks differ from rank 0's; rank 0 keeps the
    stream a single process would have, and every rank has already built identical initial weights."""
    if rank() > 0:
        seed_everything(seed + rank())


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """The model under DistributedDataParallel (itself on one process).

    Only parameters with requires_grad are registered, so frozen encoder weights are never all-reduced. Each step
    trains one task, so the other tasks' prefixes and heads get no gradient in that step: find_unused_parameters
    lets DDP discover that per step (static_graph would assume one fixed set), and since every rank trains the same
    task, those parameters are unused on all ranks and DDP leaves their gradients None, as a single process does,
    so AdamW skips them exactly as it would there. Buffers (position ids) never change, so they are not re-broadcast.
    """
    if world_size() == 1:
        return model
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=True, forward_sync_buffers=False,
    )


def accumulation_context(model: nn.Module, sync: bool) -> AbstractContextManager:
    """DDP's no_sync for the micro-steps before the last: gradients add up locally and are all-reduced once."""
    if sync or not isinstance(model, DistributedDataParallel):
        return nullcontext()
    return model.no_sync()


def rank_rows(indices: list[int]) -> list[int]:
    """This rank's slice of a global batch: every world_size-th row from its rank, so slices differ by at most
    one row, and each rank gets a spread of lengths from a length-grouped batch."""
    return indices[rank()::world_size()]


def loss_share(terms: int, total: int) -> tuple[float, float]:
    """This rank's share of the loss terms of the whole global batch (1.0 on one process), and that batch's number
    of terms, from this rank's ``terms`` and the global batch's ``total`` (every rank draws the same global batch,
    so each knows the total without asking the others: no collective and no wait for the device).

    A task's loss is a mean over its terms (rows, or labelled tokens for NER), so the loss of the global batch is
    the sum of each rank's mean weighted by its share; scaling the local loss by share * world_size undoes DDP's
    division by world_size, and the averaged gradient is the gradient of one process on the whole batch, also
    when the slices are uneven or hold different numbers of tokens.
    """
    if world_size() == 1:
        return 1.0, float(terms)
    return (terms / total if total else 0.0), float(total)


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum over ranks (in place), e.g. of the share-weighted losses, which is the global batch's loss."""
    if world_size() > 1:
        dist.all_reduce(value)
    return value


def gather_from_all(value: T) -> list[T]:
    """Every rank's value, in rank order, on every rank."""
    if world_size() == 1:
        return [value]
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def gather_to_main(value: T) -> list[T] | None:
    """Every rank's value, in rank order, on the main rank alone (None elsewhere): only it decodes and scores."""
    if world_size() == 1:
        return [value]
    values: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(value, values, dst=0)
    return values


def broadcast_from_main(value: T) -> T:
    """The main rank's value on every rank, so decisions taken from its metrics (which checkpoint is best, early
    stopping) are the same everywhere and no rank waits in a collective that the others skipped."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(items: list[T]) -> list[T]:
    """This rank's share of an evaluation's batches (round-robin, so shares differ by at most one batch)."""
    return items[rank()::world_size()]


def gather_indexed(pairs: list[tuple[int, T]], count: int) -> list[T] | None:
    """Every rank's (index, value) pairs as one list on the main rank, None elsewhere.

    Each index in range(count) must come exactly once over all ranks: a shard that was dropped or counted twice
    would silently change the metrics, so it is an error instead.
    """
    parts = gather_to_main(pairs)
    if not is_main():
        return None
    values: list[Any] = [None] * count
    seen = [False] * count
    for index, value in (pair for part in parts for pair in part):
        if seen[index]:
            raise RuntimeError(f"evaluation index {index} was computed by two ranks")
        seen[index], values[index] = True, value
    missing = seen.count(False)
    if missing:
        raise RuntimeError(f"{missing} of {count} evaluation indices were computed by no rank")
    return values


@contextmanager
def main_rank_first() -> Iterator[None]:
    """Rank 0 runs the body first (tokenizing and filling the feature cache), the others after it (reading it),
    so ranks never race on writing the same cache file."""
    waits = world_size() > 1
    if waits and not is_main():
        dist.barrier(group=_barrier_group)
    yield
    if waits and is_main():
        dist.barrier(group=_barrier_group)


def allreduce_bytes(model: nn.Module) -> int:
    """Bytes of gradient one optimiser step all-reduces: every trainable parameter (DDP reduces whole buckets, so
    the other tasks' prefixes and heads travel as zeros); frozen encoder weights never travel."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
