"""The prefix bank: every named prefix of an experiment, and which prefixes each task attends to."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch
from torch import nn

from multitask.errors import ConfigError
from multitask.prefix.config import PrefixBankConfig, PrefixConfig
from multitask.prefix.encoder import PrefixEncoder
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
    """What one task asks of the bank: an optional group, and its resolved length, reparameterisation and dropout
    (see :mod:`multitask.tuning`); unset values fall back to the bank's default prefix settings."""

    task: str
    group: str | None = None
    length: int | None = None
    reparameterize: bool | None = None
    dropout: float | None = None


def _settle(default: PrefixConfig, requests: list[TaskPrefixRequest], length: int | None = None) -> PrefixConfig:
    """One prefix's settings from the tasks that use it: the longest length, reparameterised if any task asks,
    the largest dropout; what no task sets comes from the bank's default prefix settings."""
    def pick(name: str, combine, override=None):
        values = [getattr(r, name) for r in requests if getattr(r, name) is not None]
        for candidate in (override, combine(values) if values else None, getattr(default, name)):
            if candidate is not None:
                return candidate
        return getattr(FALLBACK, name)

    return replace(default, length=pick("length", max, length), reparameterize=pick("reparameterize", any),
                   dropout=pick("dropout", max))


@dataclass(frozen=True)
class PrefixLayout:
    """Resolved plan: the config of each named prefix, and the ordered prefix names of each task."""

    prefixes: dict[str, PrefixConfig]
    task_prefixes: dict[str, tuple[str, ...]]


def plan_layout(config: PrefixBankConfig, requests: list[TaskPrefixRequest]) -> PrefixLayout:
    """Turn the prefix mode and the tasks' requests into named prefixes (shared/per_task/hybrid/groups)."""
    default = config.prefix
    prefixes: dict[str, PrefixConfig] = {}
    task_prefixes: dict[str, tuple[str, ...]] = {}
    for request in requests:
        if not _NAME.match(request.task):
            raise ConfigError(f"task name {request.task!r}: expected letters, digits, '_' or '-'")
        if config.mode == "shared":
            prefixes[SHARED] = _settle(default, requests)
            task_prefixes[request.task] = (SHARED,)
        elif config.mode == "per_task":
            prefixes[f"task_{request.task}"] = _settle(default, [request])
            task_prefixes[request.task] = (f"task_{request.task}",)
        elif config.mode == "hybrid":
            prefixes[SHARED] = _settle(default, requests, config.shared_length)
            prefixes[f"task_{request.task}"] = _settle(default, [request])
            task_prefixes[request.task] = (SHARED, f"task_{request.task}")
        else:  # groups: tasks naming the same group share one prefix; a task without a group gets its own
            group = request.group or request.task
            name = f"group_{group}"
            members = [r for r in requests if (r.group or r.task) == group]
            explicit = {r.length for r in members if r.length is not None}
            if group not in config.group_lengths and len(explicit) > 1:
                raise ConfigError(f"group {group!r}: tasks ask for different prefix lengths")
            prefixes.setdefault(name, _settle(default, members, config.group_lengths.get(group)))
            task_prefixes[request.task] = (name,)
    return PrefixLayout(prefixes, task_prefixes)


@dataclass
class PrefixKV:
    """Per-example prefix keys/values for one forward pass, read by the prefix attention function.

    keys/values: ``(batch, num_layers, num_heads, P, head_dim)``; mask: ``(batch, P)``, False where an example's
    task has a shorter prefix than the longest one in the batch.
    """

    keys: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[:, index], self.values[:, index]

    @property
    def fully_visible(self) -> bool:
        return bool(self.mask.all())


class PrefixBank(nn.Module):
    """Holds the named prefix encoders and assembles each example's prefix from its task."""

    def __init__(self, layout: PrefixLayout, num_layers: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.layout = layout
        self.task_names = list(layout.task_prefixes)
        self.encoders = nn.ModuleDict(
            {name: PrefixEncoder(cfg, num_layers, num_heads, head_dim) for name, cfg in layout.prefixes.items()}
        )
        self.dropout = nn.Dropout(max((cfg.dropout for cfg in layout.prefixes.values()), default=0.0))

    def task_index(self, task: str) -> int:
        return self.task_names.index(task)

    def prefix_length(self, task: str) -> int:
        return sum(self.encoders[name].length for name in self.layout.task_prefixes[task])

    def forward(self, task_ids: torch.Tensor) -> PrefixKV | None:
        """Gather each example's prefix; every prefix encoder runs once per call, however many examples use it."""
        unique_ids = torch.unique(task_ids, sorted=True)
        tasks = [self.task_names[i] for i in unique_ids.tolist()]
        lengths = [self.prefix_length(task) for task in tasks]
        longest = max(lengths)
        if longest == 0:
            return None
        computed = {name: self.encoders[name]() for name in {n for t in tasks for n in self.layout.task_prefixes[t]}}
        per_task, masks = [], []
        for task, length in zip(tasks, lengths):
            parts = [computed[name] for name in self.layout.task_prefixes[task]]
            kv = torch.cat(parts, dim=3)  # (layers, 2, heads, P_task, head_dim)
            per_task.append(nn.functional.pad(kv, (0, 0, 0, longest - length)))
            masks.append(torch.arange(longest, device=task_ids.device) < length)
        stacked = torch.stack(per_task)  # (tasks, layers, 2, heads, P, head_dim)
        position = torch.searchsorted(unique_ids, task_ids)
        kv = self.dropout(stacked[position])
        return PrefixKV(keys=kv[:, :, 0], values=kv[:, :, 1], mask=torch.stack(masks)[position])

    def fold(self) -> None:
        """Replace every reparameterised encoder by its flat equivalent (for saving and fast inference)."""
        for name in list(self.encoders):
            self.encoders[name] = self.encoders[name].fold()
