"""The frozen-layer cache: hidden states entering the lowest layer with a trainable prefix, computed once per training
input and reused in every later step and epoch.

Below that layer nothing depends on a trained parameter, and with the frozen layers' dropout off their output for an
input is the same every time. States are stored unpadded per input (so dynamic padding and length grouping keep
working) and padded per batch. ``memory`` keeps them for this run (on a GPU run: in the GPU's memory when they fit,
else pinned host memory; ``device`` and ``host`` choose); ``disk`` keeps them in memory-mapped ``.npy``
arrays keyed by everything they depend on (encoder, boundary, frozen prefixes, tokenizer, the inputs, dtype), so a
later run on the same data reuses them. The cache never grows beyond ``max_gb``: inputs past it are recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from multitask.data.cache import tokenizer_fingerprint
from multitask.data.features import Feature
from multitask.device import autocast
from multitask.encoder_stages import pad_states
from multitask.errors import CheckpointError
from multitask.experiment import ExperimentConfig, FrozenCacheConfig
from multitask.model import ModelInputs, MultiTaskModel
from multitask.runtime import TaskRuntime
from multitask.utils.atomic import write_json
from multitask.utils.readback import read_json_file

log = logging.getLogger(__name__)
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# numpy has no bfloat16: such states are stored as their raw 16 bits.
NUMPY_DTYPES = {"float16": np.float16, "bfloat16": np.int16, "float32": np.float32}


class Budget:
    """Bytes the cache may still take, shared by all tasks' stores."""

    def __init__(self, max_bytes: float) -> None:
        self.left = max_bytes

    def take(self, size: int) -> bool:
        if size > self.left:
            return False
        self.left -= size
        return True


class MemoryStore:
    """States of one task's inputs, in this process's memory: the host's, or the GPU's (``location: device``), as
    the states it is given are."""

    def __init__(self, dtype: torch.dtype, budget: Budget) -> None:
        self.dtype, self.budget = dtype, budget
        self.states: dict[int, torch.Tensor] = {}

    def get(self, index: int) -> torch.Tensor | None:
        return self.states.get(index)

    def put(self, items: dict[int, torch.Tensor]) -> None:
        for index, state in items.items():
            if self.budget.take(state.numel() * state.element_size()):
                self.states[index] = state

    @property
    def stored(self) -> int:
        return len(self.states)

    @property
    def stored_bytes(self) -> int:
        return sum(state.numel() * state.element_size() for state in self.states.values())


class DiskStore:
    """States of one task's inputs in one memory-mapped array (all inputs' tokens back to back) and a filled flag per
    input. An input's flag is set only after its states are flushed, so a write killed half-way is recomputed."""

    def __init__(self, folder: Path, lengths: Sequence[int], hidden: int, dtype: str, budget: Budget) -> None:
        self.dtype = TORCH_DTYPES[dtype]
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        row_bytes = hidden * np.dtype(NUMPY_DTYPES[dtype]).itemsize
        # The inputs the budget allows, from the first: the array is allocated once at that size.
        fits = 0
        while fits < len(lengths) and budget.take(int(lengths[fits]) * row_bytes):
            fits += 1
        self.capacity = fits
        folder.mkdir(parents=True, exist_ok=True)
        shape = (int(self.offsets[fits]), hidden)
        description = {"inputs": len(lengths), "stored_inputs": fits, "dtype": dtype, "hidden": hidden}
        reuse = self._vouched(folder / "meta.json", description)
        self.states = self._open(folder / "states.npy", NUMPY_DTYPES[dtype], shape, reuse)
        self.filled = self._open(folder / "filled.npy", np.uint8, (fits,), reuse)
        # Rewritten only after the arrays started afresh: a kill in between leaves the old (damaged or other)
        # description, so the next run starts them afresh again.
        if not reuse or not (folder / "meta.json").exists():
            write_json(folder / "meta.json", description)

    @staticmethod
    def _vouched(meta: Path, description: dict[str, Any]) -> bool:
        """Whether the arrays beside ``meta`` may be reused. A meta.json that is damaged, or describes other arrays,
        cannot vouch for them, so they start afresh: that costs a recomputation, while states of unknown origin
        could silently train on wrong inputs. None at all (a run killed before writing it) is as before: the
        arrays are reused when their shape and dtype fit, since an input's flag is set only after its states."""
        if not meta.exists():
            return True
        try:
            saved = read_json_file(meta, "frozen-cache description")
        except CheckpointError as error:
            log.warning("%s; starting that frozen cache afresh", error)
            return False
        if saved != description:
            log.warning("frozen cache %s describes other arrays than %s; starting it afresh", meta, description)
            return False
        return True

    @staticmethod
    def _open(path: Path, dtype, shape: tuple[int, ...], reuse: bool) -> np.memmap:
        if path.exists() and reuse:
            try:
                array = np.load(path, mmap_mode="r+")
                if array.shape == shape and array.dtype == dtype:
                    return array
            except (OSError, ValueError):
                pass
            log.warning("frozen cache %s does not match (shape or damage); starting it afresh", path)
        return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)

    def get(self, index: int) -> torch.Tensor | None:
        if index >= self.capacity or not self.filled[index]:
            return None
        rows = torch.from_numpy(np.array(self.states[self.offsets[index] : self.offsets[index + 1]]))
        return rows.view(self.dtype)

    def put(self, items: dict[int, torch.Tensor]) -> None:
        kept = [index for index in items if index < self.capacity]
        if not kept:
            return
        for index in kept:
            self.states[self.offsets[index] : self.offsets[index + 1]] = items[index].view(
                torch.int16 if self.dtype == torch.bfloat16 else self.dtype).numpy()
        self.states.flush()
        self.filled[kept] = 1
        self.filled.flush()

    @property
    def stored(self) -> int:
        return int(self.filled.sum())

    @property
    def stored_bytes(self) -> int:
        lengths = np.diff(self.offsets[: self.capacity + 1])
        return int((lengths * self.filled.astype(bool)).sum()) * self.states.shape[1] * self.states.dtype.itemsize


@contextmanager
def evaluating(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for a moment, then back to the mode it was in."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _identity(parts: dict, features: Sequence[Feature]) -> str:
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode())
    for feature in features:
        digest.update(np.asarray(feature.input_ids, dtype=np.int64).tobytes())
        digest.update(b"|" if feature.token_type_ids is None else np.asarray(feature.token_type_ids).tobytes())
    return digest.hexdigest()[:32]


def frozen_prefix_hash(model: MultiTaskModel, task: str, boundary: int) -> str:
    """Hash of the task's prefix keys/values in the layers below ``boundary`` (frozen prefixes shape its states)."""
    digest = hashlib.sha256()
    if model.prefix_bank is not None:
        for name in sorted(model.prefix_bank.layout.task_prefixes[task]):
            encoder = model.prefix_bank.encoders[name]
            lower = [i for i, layer in enumerate(encoder.layers) if layer < boundary]
            if lower and encoder.length:
                digest.update(f"{name}:{model.prefix_bank.layout.attention_of(name)}".encode())
                digest.update(encoder()[lower].detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:32]


# Share of the GPU's free memory (when training starts) a cache may take by default: the rest is for activations.
DEVICE_SHARE = 0.5


def place(location: str, device: torch.device, needed: float, max_bytes: float) -> str:
    """Where the states live: ``disk``, ``host`` (this process's memory) or ``device`` (the GPU's).

    ``memory`` (the default) is the GPU's on a CUDA run when the whole cache fits ``max_gb`` and half the GPU's
    free memory (no copies at all, each step reads its states where it runs), else the host's, pinned; on the CPU
    it is the host's, as ``device`` is there too."""
    if device.type != "cuda":
        return "disk" if location == "disk" else "host"
    if location != "memory":
        return location
    free, _ = torch.cuda.mem_get_info(device)
    return "device" if needed <= min(max_bytes, DEVICE_SHARE * free) else "host"


class FrozenLayerCache:
    """Cached states of the training inputs of every task that has frozen layers: those entering its own lowest
    layer with a trainable prefix (``boundaries``; tasks train one at a time, so each task has its own)."""

    def __init__(
        self, model: MultiTaskModel, config: FrozenCacheConfig, boundaries: dict[str, int],
        features: dict[str, list[Feature]], identity: dict, root: Path | None, rank: int = 0,
        device: torch.device = torch.device("cpu"),
    ) -> None:
        self.model, self.config = model, config
        self.boundaries = {task: boundary for task, boundary in boundaries.items() if boundary > 0}
        self.dtype = TORCH_DTYPES[config.dtype]
        budget = Budget(config.max_gb * 1024**3)
        hidden = model.encoder.config.hidden_size
        needed = sum(len(f) for task in self.boundaries for f in features[task]) * hidden * self.dtype.itemsize
        self.location = place(config.location if root is not None or config.location != "disk" else "host", device,
                              needed, budget.left)
        self.stores: dict[str, MemoryStore | DiskStore] = {}
        for task, boundary in self.boundaries.items():
            task_features = features[task]
            if self.location == "disk":
                key = _identity({**identity, "boundary": boundary, "dtype": config.dtype,
                                 "prefixes": frozen_prefix_hash(model, task, boundary)}, task_features)
                folder = root / "frozen" / f"{key}-rank{rank}"
                self.stores[task] = DiskStore(folder, [len(f) for f in task_features], hidden, config.dtype, budget)
            else:
                self.stores[task] = MemoryStore(self.dtype, budget)
        self.hits = self.misses = 0

    def covers(self, task: str) -> bool:
        return task in self.stores

    def states(self, task: str, indices: list[int], compute: Callable[[list[int]], list[torch.Tensor]]) -> list[torch.Tensor]:
        """The states of the task's training inputs ``indices`` (each ``(tokens, hidden)``, in the cache dtype);
        ``compute`` gives those of inputs not cached yet, which are stored while the budget allows."""
        store = self.stores[task]
        found = {index: store.get(index) for index in indices}
        missing = [index for index, state in found.items() if state is None]
        self.hits += len(indices) - len(missing)
        self.misses += len(missing)
        if missing:
            states = compute(missing)
            if states and states[0].device.type != "cpu":
                kept, fresh = self._from_device(states)
                store.put(dict(zip(missing, kept)))
                found.update(zip(missing, fresh))
            else:
                computed = {index: state.to(self.dtype).cpu() for index, state in zip(missing, states)}
                store.put(computed)
                found.update(computed)
        return [found[index] for index in indices]

    def _from_device(self, states: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """States computed on a GPU as the store keeps them and as this step uses them (each ``(tokens, hidden)``
        in the cache dtype): packed back to back on the device in one cast; for a store outside the GPU, brought
        over in one copy into pinned memory (so later uploads need not wait), not one blocking copy per input."""
        packed = torch.cat(states).to(self.dtype)
        lengths = [state.shape[0] for state in states]
        fresh = list(packed.split(lengths))
        if self.location == "device":
            return fresh, fresh
        host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
        host.copy_(packed)
        return list(host.split(lengths)), fresh

    def summary(self) -> dict[str, Any]:
        return {"boundaries": dict(self.boundaries), "location": self.location, "hits": self.hits,
                "misses": self.misses,
                "stored_inputs": sum(store.stored for store in self.stores.values()),
                "stored_bytes": sum(store.stored_bytes for store in self.stores.values())}


def open_frozen_cache(model: MultiTaskModel, experiment: ExperimentConfig, tasks: list[TaskRuntime],
                      encoder_fingerprint: str, tokenizer: Any, rank: int, device: torch.device,
                      ) -> FrozenLayerCache | None:
    """The run's cache of its training inputs' frozen-layer states; None when it is off, or when every task has
    something to train from layer 0 up."""
    settings = experiment.optimization.frozen_cache
    if not settings.enabled:
        return None
    boundaries = {t.name: model.frozen_below(t.name) for t in tasks}
    if not any(boundaries.values()):
        log.warning("frozen_cache: every task has something to train from layer 0 up (a prefix there, or a "
                    "trained encoder); there is nothing to cache, so the cache is off")
        return None
    identity = {"encoder": encoder_fingerprint, "tokenizer": tokenizer_fingerprint(tokenizer)}
    root = Path(experiment.cache_dir) if experiment.cache_dir else None
    cache = FrozenLayerCache(model, settings, boundaries, {t.name: t.features["train"] for t in tasks},
                             identity, root, rank, device)
    where = {"device": "GPU memory", "host": "host memory", "disk": "files under the cache dir"}[cache.location]
    log.info("frozen cache: states entering layer %s, %s, in %s (at most %.1f GB); layers below run without "
             "dropout", ", ".join(f"{n} {b}" for n, b in boundaries.items()), settings.dtype, where,
             settings.max_gb)
    return cache


def lower_states(cache: FrozenLayerCache, runtime: TaskRuntime, indices: list[int], pad_id: int,
                 device: torch.device, precision: str) -> list[torch.Tensor]:
    """States entering the task's cache boundary for some of its training inputs, as every epoch would see them
    (the frozen layers without dropout)."""
    features = [runtime.features["train"][i] for i in indices]
    batch = runtime.task.collate(features, pad_id)
    inputs = ModelInputs.of_task(batch, cache.model.task_id(runtime.name)).to(device)
    with torch.no_grad(), evaluating(cache.model), autocast(device, precision):
        states = cache.model.encode_lower(inputs, cache.boundaries[runtime.name])
    return [states[row, : len(feature)] for row, feature in enumerate(features)]


def with_cached_states(cache: FrozenLayerCache, runtime: TaskRuntime, rows: list[int], inputs: ModelInputs,
                       pad_id: int, device: torch.device, precision: str) -> ModelInputs:
    """``inputs`` (a batch of the task's training inputs ``rows``) carrying the states that enter its cache
    boundary, so the model runs only the layers above it; states not cached yet are computed and stored."""
    states = cache.states(runtime.name, rows,
                          lambda missing: lower_states(cache, runtime, missing, pad_id, device, precision))
    if device.type != "cpu":  # padded where the layers run (pinned or device states: nothing waits)
        states = [state.to(device, non_blocking=True) for state in states]
    inputs.states = pad_states(states, inputs.input_ids.shape[1]).float()  # the precision the layers run in
    inputs.boundary = cache.boundaries[runtime.name]
    return inputs
