"""The runs a server holds, changed while it serves: added from a model store or an admin call, replaced, removed.

Every change builds a new :class:`~multitask.serve.catalog.Catalog` (one merged model over the runs) and swaps it
in with one assignment; requests parse against the catalog of the moment and keep it until their answer, so a
request in flight when its task goes away finishes normally, and later ones get 404. Changes run one at a time
(a lock), off the event loop and off the model thread, so loading a run never stalls requests.

All runs share the first loaded run's encoder and tokenizer; a run trained on another encoder is refused (its
prefixes would mean nothing on this one), as is a LoRA or fully fine-tuned run beside others (its encoder is its
own, so its inputs could never share a pass).
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from multitask.errors import ConfigError, MultitaskError
from multitask.run import TrainedRun, load_run
from multitask.serve.catalog import Catalog, solo_reason
from multitask.serve.store import StoredRun, scan_store

log = logging.getLogger("multitask.serve")
RUN_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


class RunNameTaken(ConfigError):
    """An admin call adds a run under a name already served (answered 409)."""


class UnknownRun(ConfigError):
    """An admin call removes a run that is not served (answered 404)."""


@dataclass
class StoreCounters:
    scans: int = 0
    load_failures: int = 0
    changes: int = 0  # runs added, replaced or removed after start


@dataclass
class Fleet:
    """The served runs and the current catalog over them. ``store``: a folder of runs to follow; ``plain``: a server
    of exactly one run (and no store) names its tasks without the run's name, as `multitask serve RUN` always did."""

    load_options: dict[str, Any] = field(default_factory=dict)
    store: Path | None = None
    counters: StoreCounters = field(default_factory=StoreCounters)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self.runs: dict[str, TrainedRun] = {}
        self.origins: dict[str, str] = {}  # run name -> "command line", "admin" or "store"
        self._stamps: dict[str, tuple[int, ...]] = {}  # store runs as loaded
        self._failed: dict[str, tuple[int, ...]] = {}  # store runs that failed, at the stamp that failed
        self.catalog = Catalog.from_runs({}, plain=False)

    # ---- changes
    def add(self, name: str, path: Path, origin: str = "admin", replace: bool = False,
            publish: bool = True) -> Catalog:
        """Load the run at ``path`` as ``name`` and serve it (``publish``: now; else at the next publish);
        MultitaskError (one line) when it cannot be."""
        with self._lock:
            catalog = self._add(name, Path(path), origin, replace, publish)
            if origin != "command line":  # a change to a serving server
                self.counters.changes += 1
            return catalog

    def remove(self, name: str) -> Catalog:
        with self._lock:
            if name not in self.runs:
                raise UnknownRun(f"run {name!r} is not served; served runs: {', '.join(self.runs) or 'none'}")
            self._drop(name)
            self.counters.changes += 1
            return self.publish()

    def sync_store(self) -> dict[str, list[str]]:
        """Bring the served store runs in line with the store: new and changed runs load, vanished ones go. A run
        that fails is logged once per version of its files and skipped; it never stops the others."""
        changes: dict[str, list[str]] = {"added": [], "replaced": [], "removed": [], "failed": []}
        if self.store is None:
            return changes
        with self._lock:
            self.counters.scans += 1
            found = scan_store(self.store)
            for name in [n for n, origin in self.origins.items() if origin == "store" and n not in found]:
                self._drop(name)
                changes["removed"].append(name)
            for stored in found.values():
                self._sync_one(stored, changes)
            if any(changes[key] for key in ("added", "replaced", "removed")):
                self.counters.changes += sum(len(changes[key]) for key in ("added", "replaced", "removed"))
                self.publish()
        return changes

    def _sync_one(self, stored: StoredRun, changes: dict[str, list[str]]) -> None:
        name = stored.name
        if self._stamps.get(name) == stored.stamp or self._failed.get(name) == stored.stamp:
            return
        if self.origins.get(name, "store") != "store":
            self._fail(stored, f"the name is taken by a run from the {self.origins[name]}")
            changes["failed"].append(name)
            return
        replacing = name in self.runs
        try:
            self._add(name, stored.path, "store", replace=True, publish=False)
        except MultitaskError as error:
            self._fail(stored, str(error))
            changes["failed"].append(name)
            return
        except Exception as error:  # a run folder must never take the server down, whatever is in it
            self._fail(stored, f"{type(error).__name__}: {error}")
            changes["failed"].append(name)
            return
        self._stamps[name] = stored.stamp
        self._failed.pop(name, None)
        changes["replaced" if replacing else "added"].append(name)

    def _fail(self, stored: StoredRun, why: str) -> None:
        self._failed[stored.name] = stored.stamp
        self.counters.load_failures += 1
        log.warning("store run %s skipped: %s", stored.name, why)

    def _add(self, name: str, path: Path, origin: str, replace: bool, publish: bool = True) -> Catalog:
        if not RUN_NAME.match(name):
            raise ConfigError(f"run name {name!r}: expected letters, digits, '.', '_' or '-'")
        if name in self.runs and not replace:
            raise RunNameTaken(f"a run named {name!r} is already served; remove it first or choose another name")
        others = {n: r for n, r in self.runs.items() if n != name}
        shared = next(iter(others.values()), None)
        options = {} if shared is None else {"encoder": shared.model.encoder, "tokenizer": shared.tokenizer}
        run = load_run(path, **options, **self.load_options)
        if shared is not None and getattr(shared.model.encoder, "pooler", None) is None and any(
                task.config.head.pooling == "pooler" for task in run.tasks.values()):
            raise ConfigError(f"{path}: a task of run {name!r} reads the encoder's pooler, which the served encoder "
                              f"was loaded without; start the server with this run among the command-line runs")
        solo = next(((n, r.experiment.method) for n, r in [(name, run), *others.items()]
                     if solo_reason(r.experiment.method) is not None), None)
        if others and solo is not None:
            own, method = solo
            raise ConfigError(f"{path}: run {own!r} uses method {method}, which {solo_reason(method)}, so it cannot be "
                              f"served with other runs; serve it alone")
        self.runs[name] = run
        self.origins[name] = origin
        log.info("run %s (%s): %s", name, origin, ", ".join(run.tasks))
        return self.publish() if publish else self.catalog

    def _drop(self, name: str) -> None:
        del self.runs[name]
        self.origins.pop(name, None)
        self._stamps.pop(name, None)
        log.info("run %s removed", name)

    def publish(self) -> Catalog:
        """Swap in a catalog over the runs now held (one assignment: requests see the old or the new one)."""
        self.catalog = Catalog.from_runs(dict(self.runs), plain=self.store is None and len(self.runs) == 1)
        return self.catalog
