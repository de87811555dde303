"""The prefix bank: every named prefix of an experiment, and which prefixes each task attends to."""

from __future__ import annotations

import re
from collections import Counter, OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from multitask.errors import ConfigError
from multitask.prefix.config import PrefixBankConfig, PrefixConfig
from multitask.prefix.encoder import PrefixEncoder
from multitask.prefix.mixture import PrefixMixture
from multitask.tuning import TuningDefaults

SHARED = "shared"
_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


# Settings a prefix falls back to when neither the experiment nor a task names them (direct library use): the
# task types' base defaults.
_DEFAULTS = TuningDefaults()
FALLBACK = PrefixConfig(length=_DEFAULTS.prefix_length, reparameterize=_DEFAULTS.reparameterize,
                        dropout=_DEFAULTS.prefix_dropout)


@dataclass(frozen=True)
class TaskPrefixRequest:
    """What one task asks of the bank: an optional group, and its resolved length, reparameterisation, dropout and
    attention (see :mod:`multitask.tuning`); unset values fall back to the bank's default prefix settings.
    ``attention_chosen``: the attention was set by the task file or the experiment, not the task type's default."""

    task: str
    group: str | None = None
    length: int | None = None
    reparameterize: bool | None = None
    dropout: float | None = None
    layers: Any = None  # the task's own prefix's layers (PrefixConfig.layers); unset: the bank's default
    attention: str | None = None
    attention_chosen: bool = False


def _same_layers(prefix: str, requests: list[TaskPrefixRequest]) -> Any:
    """The layers the tasks sharing one prefix ask for: they must agree (a prefix has one depth)."""
    asked = {str(r.layers): r.layers for r in requests if r.layers is not None}
    if len(asked) > 1:
        raise ConfigError(f"prefix {prefix!r}: its tasks ask for different layers ({', '.join(asked)}); give them "
                          f"the same prefix.layers")
    return next(iter(asked.values()), None)


def _same_attention(prefix: str, requests: list[TaskPrefixRequest]) -> str:
    """How the tasks sharing one prefix attend to it: as a task file or the experiment chose (they must agree),
    else as their task types' default when those agree, else P-Tuning v2's joint attention."""
    chosen = {r.attention for r in requests if r.attention is not None and r.attention_chosen}
    if len(chosen) > 1:
        raise ConfigError(f"prefix {prefix!r}: its tasks ask for different attention ({', '.join(sorted(chosen))}); "
                          f"give them the same prefix.attention")
    defaults = {r.attention for r in requests if r.attention is not None}
    return (chosen or defaults).pop() if chosen or len(defaults) == 1 else _DEFAULTS.prefix_attention


def _settle(default: PrefixConfig, requests: list[TaskPrefixRequest], length: int | None = None,
            layers: Any = None) -> PrefixConfig:
    """One prefix's settings from the tasks that use it: the longest length, reparameterised if any task asks,
    the largest dropout, the layers they agree on; what no task sets comes from the bank's default settings."""
    def pick(name: str, combine, override=None):
        values = [getattr(r, name) for r in requests if getattr(r, name) is not None]
        for candidate in (override, combine(values) if values else None, getattr(default, name)):
            if candidate is not None:
                return candidate
        return getattr(FALLBACK, name)

    return replace(default, length=pick("length", max, length), reparameterize=pick("reparameterize", any),
                   dropout=pick("dropout", max), layers=layers if layers is not None else default.layers)


@dataclass(frozen=True)
class PrefixLayout:
    """Resolved plan: the config of each named prefix, the ordered prefix names of each task, and how each prefix is
    attended (joint or separate, ``PrefixBankConfig.attention``; a prefix not named there: joint)."""

    prefixes: dict[str, PrefixConfig]
    task_prefixes: dict[str, tuple[str, ...]]
    attention: dict[str, str] = field(default_factory=dict)
    # prefix -> the frozen source prefixes mixed into it per input (prefix.transfer: mixture; see prefix/mixture.py)
    mixtures: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def attention_of(self, prefix: str) -> str:
        return self.attention.get(prefix, _DEFAULTS.prefix_attention)


def plan_layout(config: PrefixBankConfig, requests: list[TaskPrefixRequest]) -> PrefixLayout:
    """Turn the prefix mode and the tasks' requests into named prefixes (shared/per_task/hybrid/groups)."""
    default = config.prefix
    if config.attention is not None:  # the experiment's choice, for requests that carry none (direct library use)
        requests = [r if r.attention is not None else replace(r, attention=config.attention, attention_chosen=True)
                    for r in requests]
    prefixes: dict[str, PrefixConfig] = {}
    task_prefixes: dict[str, tuple[str, ...]] = {}
    for request in requests:
        if not _NAME.match(request.task):
            raise ConfigError(f"task name {request.task!r}: expected letters, digits, '_' or '-'")
        own = f"task_{request.task}"
        if config.mode == "shared":
            prefixes[SHARED] = _settle(default, requests,
                                       layers=config.shared_layers or _same_layers(SHARED, requests))
            task_prefixes[request.task] = (SHARED,)
        elif config.mode == "per_task":
            prefixes[own] = _settle(default, [request], layers=request.layers)
            task_prefixes[request.task] = (own,)
        elif config.mode == "hybrid":  # the tasks' layers are their own prefixes'; the shared one has shared_layers
            prefixes[SHARED] = _settle(default, requests, config.shared_length, config.shared_layers)
            prefixes[own] = _settle(default, [request], layers=request.layers)
            task_prefixes[request.task] = (SHARED, own)
        else:  # groups: tasks naming the same group share one prefix; a task without a group gets its own
            group = request.group or request.task
            name = f"group_{group}"
            members = [r for r in requests if (r.group or r.task) == group]
            explicit = {r.length for r in members if r.length is not None}
            if group not in config.group_lengths and len(explicit) > 1:
                raise ConfigError(f"group {group!r}: tasks ask for different prefix lengths")
            prefixes.setdefault(name, _settle(default, members, config.group_lengths.get(group),
                                              _same_layers(name, members)))
            task_prefixes[request.task] = (name,)
    attention = {name: _same_attention(name, [r for r in requests if name in task_prefixes[r.task]])
                 for name in prefixes}
    return PrefixLayout(prefixes, task_prefixes, attention)


@dataclass(frozen=True)
class BatchTasks:
    """Which tasks a batch holds, worked out on the host once per batch: the sorted task ids present, each row's
    index among them, and each task's rows. On a GPU, reading them back from device tensors in every forward (and
    in every layer) would stall the host until the device caught up."""

    ids: tuple[int, ...]
    position: torch.Tensor
    rows: tuple[torch.Tensor, ...]

    @classmethod
    def of(cls, task_ids: torch.Tensor) -> "BatchTasks":
        """From the batch's task ids (on the host, before they travel; read back from a device otherwise)."""
        unique = torch.unique(task_ids, sorted=True)
        position = torch.searchsorted(unique, task_ids)
        rows = tuple((position == index).nonzero(as_tuple=True)[0] for index in range(len(unique)))
        return cls(tuple(unique.tolist()), position, rows)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "BatchTasks":
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return BatchTasks(self.ids, move(self.position), tuple(move(r) for r in self.rows))


@dataclass
class LayerPrefix:
    """One attention layer's prefix: keys/values ``(batch, heads, P, head_dim)``, mask ``(batch, P)`` (False where an
    example's task has no prefix token at that position), and whether every example sees every position."""

    keys: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor
    fully_visible: bool
    # Layers with the same key see the same prefix positions: the attention mask widened for one serves them all.
    mask_key: int = -1


@dataclass
class PrefixKV:
    """Per-example keys/values of the prefixes attended one way (joint or separate) in one forward pass.

    keys/values: ``(batch, num_layers, num_heads, P, head_dim)``; mask: ``(batch, P)`` or, when prefixes differ
    between layers, ``(batch, num_layers, P)``: False where an example's task has no prefix token there.
    ``columns``: per layer, the positions some example of the batch sees (None: all of them; an empty list: the
    layer has no prefix and attends as the plain encoder does), known from the layout without reading tensors.
    """

    keys: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor
    columns: list[list[int] | None] | None = None
    full: list[bool] | None = None  # per layer: every example sees every kept position
    # per layer: ``columns`` as a slice or an index tensor on the batch's device (see PrefixBank._depth_plan)
    column_index: list[slice | torch.Tensor | None] | None = None

    def layer(self, index: int) -> LayerPrefix | None:
        mask = self.mask if self.mask.dim() == 2 else self.mask[:, index]
        keys, values = self.keys[:, index], self.values[:, index]
        columns = None if self.columns is None else self.columns[index]
        if columns is not None:
            if not columns:
                return None
            take = columns if self.column_index is None else self.column_index[index]
            keys, values, mask = keys[:, :, take], values[:, :, take], mask[:, take]
        full = bool(mask.all()) if self.full is None else self.full[index]  # the bank always says
        same_everywhere = self.mask.dim() == 2 and columns is None
        return LayerPrefix(keys, values, mask, full, -1 if same_everywhere else index)


@dataclass
class PrefixInputs:
    """What the prefix attention function reads in one forward pass: the prefixes attended in one softmax with the
    real tokens (``joint``) and those attended in a softmax of their own (``separate``); either may be None."""

    joint: PrefixKV | None = None
    separate: PrefixKV | None = None
    # Attention masks widened by the joint prefix in this forward pass, so that layers seeing the same prefix
    # positions build it once (see multitask.prefix.injection).
    widened: dict = field(default_factory=dict, repr=False, compare=False)

    def layer(self, index: int) -> tuple[LayerPrefix | None, LayerPrefix | None]:
        return tuple(None if kv is None else kv.layer(index) for kv in (self.joint, self.separate))


# Depth plans kept per bank (one per set of tasks met in a batch): a server of thousands of tasks meets far more
# sets than it can keep, so the least recently used are dropped.
PLAN_CACHE_SIZE = 1024


def _positions(positions: list[int], device: torch.device) -> slice | torch.Tensor:
    """Sorted positions as a slice where they run without a gap (a view, nothing to upload), else an index tensor
    on ``device`` (uploaded once by the caller's cache; a Python list would be uploaded at every use)."""
    if positions == list(range(positions[0], positions[-1] + 1)):
        return slice(positions[0], positions[-1] + 1)
    return torch.tensor(positions, dtype=torch.long, device=device)


class PrefixBank(nn.Module):
    """Holds the named prefix encoders and assembles each example's prefix from its task.

    ``modules``: the layout's prefix encoders and mixtures, already built (a server assembling one bank from many
    runs' trained prefixes); otherwise new ones are made."""

    def __init__(self, layout: PrefixLayout, num_layers: int, num_heads: int, head_dim: int,
                 modules: tuple[dict[str, PrefixEncoder], dict[str, PrefixMixture]] | None = None) -> None:
        super().__init__()
        self.layout = layout
        self.num_layers = num_layers
        self._plans: OrderedDict[tuple, tuple] = OrderedDict()  # see _depth_plan
        self._layer_index: dict[tuple, slice | torch.Tensor] = {}  # see _full_depth
        self.task_names = list(layout.task_prefixes)
        self._task_index = {task: index for index, task in enumerate(self.task_names)}
        if modules is None:
            encoders = {name: PrefixEncoder(cfg, num_layers, num_heads, head_dim)
                        for name, cfg in layout.prefixes.items()}
            mixtures = {name: PrefixMixture(list(sources), encoders[name].kv_shape, num_heads * head_dim)
                        for name, sources in layout.mixtures.items()}
        else:
            encoders, mixtures = modules
        self.encoders = nn.ModuleDict(encoders)
        self.mixtures = nn.ModuleDict(mixtures)
        self.dropout = nn.Dropout(max((cfg.dropout for cfg in layout.prefixes.values()), default=0.0))
        # Fixed by the layout (a prefix's layers never change), and read on every forward: worked out once.
        self.every_layer = all(len(encoder.layers) == num_layers for encoder in self.encoders.values())

    def task_index(self, task: str) -> int:
        return self._task_index[task]

    def prefix_length(self, task: str) -> int:
        return sum(self.encoders[name].length for name in self.layout.task_prefixes[task])

    def prefixed_layers(self, task: str | None = None) -> tuple[int, ...]:
        """The layers in which ``task`` (default: any task) has a prefix token."""
        names = self.layout.task_prefixes[task] if task is not None else list(self.encoders)
        return tuple(sorted({layer for name in names if self.encoders[name].length for layer in
                             self.encoders[name].layers}))

    def shared_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of every prefix that more than one task attends to (shared, hybrid, groups)."""
        users = Counter(name for names in self.layout.task_prefixes.values() for name in names)
        return [p for name, count in users.items() if count > 1 for p in self.encoders[name].parameters()
                if p.requires_grad]

    def shared_below(self, tasks: list[str]) -> int:
        """The lowest layer in which the given tasks' prefixes differ (all layers: they are the same throughout)."""
        for layer in range(self.num_layers):
            present = {tuple(n for n in self.layout.task_prefixes[t]
                             if self.encoders[n].length and layer in self.encoders[n].layers) for t in tasks}
            if len(present) > 1:
                return layer
        return self.num_layers

    def _attended(self, task: str, attention: str) -> list[str]:
        """The task's prefixes attended one way (joint or separate), in the task's order."""
        return [name for name in self.layout.task_prefixes[task] if self.layout.attention_of(name) == attention]

    def _layer_positions(self, task: str, attention: str) -> list[list[bool]]:
        """Per layer, which of the task's concatenated prefix positions (those attended one way) hold a token there."""
        rows = [[] for _ in range(self.num_layers)]
        for name in self._attended(task, attention):
            encoder = self.encoders[name]
            for layer in range(self.num_layers):
                rows[layer].extend([layer in encoder.layers] * encoder.length)
        return rows

    def _depth_plan(self, tasks: tuple[str, ...], longest: int, attention: str,
                    device: torch.device) -> tuple[torch.Tensor, list, list[bool], list]:
        """For prefixes that differ between layers: each task's visible positions per layer ``(tasks, layers, P)``
        (on ``device``), the positions each layer keeps (None: all of them), whether every task sees all it keeps,
        and the kept positions as a slice or an index tensor on ``device``. It depends only on the layout and the
        tasks in the batch, so it is worked out (and uploaded) once per set of tasks."""
        key = (tasks, longest, attention, device)
        if key in self._plans:
            self._plans.move_to_end(key)
        else:
            while len(self._plans) >= PLAN_CACHE_SIZE:
                self._plans.popitem(last=False)
            visible = [[row + [False] * (longest - len(row)) for row in self._layer_positions(task, attention)]
                       for task in tasks]
            columns, full = [], []
            for layer in range(self.num_layers):
                kept = [p for p in range(longest) if any(v[layer][p] for v in visible)]
                columns.append(None if len(kept) == longest else kept)
                full.append(all(v[layer][p] for v in visible for p in kept))
            index = [_positions(kept, device) if kept else None for kept in columns]
            self._plans[key] = (torch.tensor(visible, dtype=torch.bool, device=device), columns, full, index)
        return self._plans[key]

    def _full_depth(self, name: str, kv: torch.Tensor) -> torch.Tensor:
        """A prefix's keys/values placed at its layers of a zero ``(num_layers, ...)`` tensor."""
        layers = self.encoders[name].layers
        if len(layers) == self.num_layers:
            return kv
        key = (name, layers, kv.device)
        if key not in self._layer_index:  # a prefix's layers never change: its index is uploaded once
            self._layer_index[key] = _positions(list(layers), kv.device)
        full = kv.new_zeros((self.num_layers, *kv.shape[1:]))
        full[self._layer_index[key]] = kv
        return full

    def forward(self, task_ids: torch.Tensor, summary: torch.Tensor | None = None,
                batch_tasks: BatchTasks | None = None) -> PrefixInputs | None:
        """Gather each example's prefix; every prefix encoder runs once per call, however many examples use it.
        ``summary``: each input's pooled word embeddings ``(batch, hidden)``, which mixtures need (see
        :meth:`needs_summary`); ``batch_tasks``: the batch's tasks, worked out on the host (else from ``task_ids``)."""
        batch_tasks = batch_tasks if batch_tasks is not None else BatchTasks.of(task_ids)
        tasks = tuple(self.task_names[i] for i in batch_tasks.ids)
        if not any(self.prefix_length(task) for task in tasks):
            return None
        computed = {name: self._full_depth(name, self.encoders[name]())
                    for name in {n for t in tasks for n in self.layout.task_prefixes[t]}}
        return PrefixInputs(*(self._assemble(tasks, batch_tasks, computed, attention, summary)
                              for attention in ("joint", "separate")))

    @property
    def needs_summary(self) -> bool:
        """Whether some prefix depends on the input (a mixture), so forward needs the inputs' summaries."""
        return len(self.mixtures) > 0

    def _mixed(self, kv: torch.Tensor, tasks: tuple[str, ...], names: list[list[str]], batch_tasks: BatchTasks,
               summary: torch.Tensor | None) -> torch.Tensor:
        """``kv`` with each mixture prefix's per-input sum of sources added at that prefix's positions."""
        delta = None
        for index, (task, task_names) in enumerate(zip(tasks, names)):
            offset = 0
            for name in task_names:
                length = self.encoders[name].length
                if name in self.mixtures:
                    if summary is None:
                        raise ValueError(f"prefix {name!r} mixes sources per input: forward needs the inputs' summary")
                    rows = batch_tasks.rows[index]
                    delta = torch.zeros_like(kv) if delta is None else delta
                    mixed = self._full_depth(name, self.mixtures[name](summary[rows]).transpose(0, 1)).transpose(0, 1)
                    delta[rows, :, :, :, offset : offset + length] = mixed.to(delta.dtype)
                offset += length
        return kv if delta is None else kv + delta

    def _assemble(self, tasks: tuple[str, ...], batch_tasks: BatchTasks, computed: dict[str, torch.Tensor],
                  attention: str, summary: torch.Tensor | None = None) -> PrefixKV | None:
        """Each example's prefixes attended one way, concatenated in its task's order and padded to the longest."""
        names = [self._attended(task, attention) for task in tasks]
        lengths = [sum(self.encoders[name].length for name in task_names) for task_names in names]
        longest = max(lengths)
        if longest == 0:
            return None
        template = next(iter(computed.values()))  # (layers, 2, heads, P, head_dim)
        per_task = []
        for task_names, length in zip(names, lengths):
            parts = [computed[name] for name in task_names] or [template[:, :, :, :0]]
            per_task.append(nn.functional.pad(torch.cat(parts, dim=3), (0, 0, 0, longest - length)))
        position = batch_tasks.position
        kv = torch.stack(per_task)[position]  # (batch, layers, 2, heads, P, head_dim)
        if self.mixtures:
            kv = self._mixed(kv, tasks, names, batch_tasks, summary)
        kv = self.dropout(kv)
        if self.every_layer:
            masks = torch.stack([torch.arange(longest, device=position.device) < length for length in lengths])
            # every task of the batch has a row in it, so every row sees every position when all are longest
            fully = [all(length == longest for length in lengths)] * self.num_layers
            return PrefixKV(keys=kv[:, :, 0], values=kv[:, :, 1], mask=masks[position], full=fully)
        masks, columns, full, index = self._depth_plan(tasks, longest, attention, position.device)
        return PrefixKV(keys=kv[:, :, 0], values=kv[:, :, 1], mask=masks[position], columns=columns, full=full,
                        column_index=index)

    def fold(self) -> None:
        """Replace every reparameterised encoder by its flat equivalent (for saving and fast inference)."""
        for name in list(self.encoders):
            self.encoders[name] = self.encoders[name].fold()
