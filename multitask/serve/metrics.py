"""Prometheus metrics in the text exposition format (0.0.4), written here rather than pulled in with
prometheus_client: the server needs counters, gauges and histograms with labels, nothing more."""

from __future__ import annotations

import math
import threading
from typing import Callable, Iterable, Iterator, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

Sample = tuple[str, dict[str, str], float]  # name (with its _bucket/_sum/_count suffix), labels, value


def format_value(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels_text(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_escape(str(value))}"' for key, value in labels.items()) + "}"


class Metric:
    """One metric family: a name, a help line, and values keyed by label values (in ``labelnames`` order)."""

    kind = "untyped"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        self.name, self.help, self.labelnames = name, help, tuple(labelnames)
        self._lock = threading.Lock()  # observed from the event loop and the model thread alike

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"metric {self.name}: expected labels {self.labelnames}, got {tuple(labels)}")
        return tuple(str(labels[name]) for name in self.labelnames)

    def _labels(self, key: tuple[str, ...]) -> dict[str, str]:
        return dict(zip(self.labelnames, key))

    def samples(self) -> Iterator[Sample]:
        raise NotImplementedError

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        lines += [f"{name}{_labels_text(labels)} {format_value(value)}" for name, labels, value in self.samples()]
        return lines


class Counter(Metric):
    kind = "counter"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def samples(self) -> Iterator[Sample]:
        with self._lock:
            items = sorted(self._values.items())
        for key, value in items:
            yield self.name, self._labels(key), value


class Gauge(Metric):
    """A value read when the metrics are scraped (``read``), so it never goes stale."""

    kind = "gauge"

    def __init__(self, name: str, help: str, read: Callable[[], float]) -> None:
        super().__init__(name, help)
        self.read = read

    def samples(self) -> Iterator[Sample]:
        yield self.name, {}, float(self.read())


class ReadCounter(Gauge):
    """A count kept elsewhere (the fleet's store scans, load failures), read when the metrics are scraped."""

    kind = "counter"


class Histogram(Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Iterable[float], labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self.buckets = tuple(sorted(set(buckets)))
        self._counts: dict[tuple[str, ...], list[int]] = {}  # per bucket, not cumulative; last: above every bound
        self._sums: dict[tuple[str, ...], float] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        slot = next((i for i, bound in enumerate(self.buckets) if value <= bound), len(self.buckets))
        with self._lock:
            counts = self._counts.setdefault(key, [0] * (len(self.buckets) + 1))
            counts[slot] += 1
            self._sums[key] = self._sums.get(key, 0.0) + value

    def samples(self) -> Iterator[Sample]:
        with self._lock:
            items = sorted((key, list(counts), self._sums[key]) for key, counts in self._counts.items())
        for key, counts, total in items:
            labels = self._labels(key)
            running = 0
            for bound, count in zip((*self.buckets, math.inf), counts):
                running += count
                yield f"{self.name}_bucket", {**labels, "le": format_value(bound)}, running
            yield f"{self.name}_sum", labels, total
            yield f"{self.name}_count", labels, running


class Registry:
    """The metric families of one server, rendered in registration order."""

    def __init__(self) -> None:
        self._metrics: dict[str, Metric] = {}

    def add(self, metric: Metric) -> Metric:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} is registered twice")
        self._metrics[metric.name] = metric
        return metric

    def render(self) -> str:
        return "\n".join(line for metric in self._metrics.values() for line in metric.render()) + "\n"


class ServerMetrics:
    """What `multitask serve` reports on /metrics."""

    def __init__(self, max_batch: int, queue_depth: Callable[[], float], in_flight: Callable[[], float]) -> None:
        self.registry = Registry()
        add = self.registry.add
        self.requests = add(Counter("multitask_requests_total", "HTTP requests answered, by endpoint and status.",
                                    ("endpoint", "status")))
        self.latency = add(Histogram("multitask_request_duration_seconds", "Time to answer a request, by endpoint.",
                                     LATENCY_BUCKETS, ("endpoint",)))
        self.inputs = add(Counter("multitask_inputs_total", "Inputs predicted, by task.", ("task",)))
        self.batch_size = add(Histogram("multitask_batch_size", "Windows (model inputs) per model pass (micro-batch).",
                                        _size_buckets(max_batch)))
        self.batch_seconds = add(Histogram("multitask_batch_duration_seconds", "Time of one model pass.",
                                           LATENCY_BUCKETS))
        add(Gauge("multitask_queue_depth", "Windows waiting for a model pass.", queue_depth))
        add(Gauge("multitask_in_flight_inputs", "Windows in the model pass now running.", in_flight))

    def watch_fleet(self, tasks: Callable[[], float], runs: Callable[[], float], scans: Callable[[], float],
                    failures: Callable[[], float], changes: Callable[[], float]) -> None:
        """The served tasks and runs, and the model store's activity, as the fleet counts them."""
        add = self.registry.add
        add(Gauge("multitask_served_tasks", "Tasks served now.", tasks))
        add(Gauge("multitask_served_runs", "Runs served now.", runs))
        add(ReadCounter("multitask_store_scans_total", "Scans of the model store (--store).", scans))
        add(ReadCounter("multitask_run_load_failures_total", "Runs of the store that could not be loaded.", failures))
        add(ReadCounter("multitask_run_changes_total", "Runs added, replaced or removed while serving.", changes))

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def render(self) -> str:
        return self.registry.render()


def _size_buckets(max_batch: int) -> list[float]:
    """Powers of two up to ``max_batch``, and ``max_batch`` itself (a full batch)."""
    bounds = [1.0]
    while bounds[-1] * 2 < max_batch:
        bounds.append(bounds[-1] * 2)
    return [*bounds, float(max_batch)]


def parse_samples(text: str) -> dict[str, float]:
    """``{'name{labels}': value}`` of a rendered page (for tests and the load benchmark)."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples
