"""Cross-request micro-batching.

Requests hand their inputs to one queue; a collector task on the event loop takes up to ``max_batch`` windows of
them per model pass, waiting at most ``max_wait_ms`` after the oldest arrived for more to join, and runs the pass in
ONE worker thread, so torch is never called concurrently and the event loop stays free to accept requests while
the model works. Inputs that arrive during a pass wait for the next one, whose window has then usually expired:
under load, batches fill up without any added wait.

Work is counted in windows (the model inputs one input becomes: a long QA context or NER text is several), since
windows, not inputs, are what a pass costs. Requests are served in turn, one input each, so a large request shares
passes with the small ones that arrive after it instead of holding them back; and a request is admitted whenever
the queue has room for one more window, so a large one competes with small ones on equal terms and is never
refused for its size alone (the queue may overshoot ``max_queue`` by one request, which the per-request limits
bound). A request leaves the queue the moment its client goes away (``submit`` is cancelled), it waits past
``max_queue_ms`` or it fails, so none of its inputs reach the model afterwards.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Sequence, TypeVar

log = logging.getLogger(__name__)

Item = TypeVar("Item")
PredictFn = Callable[[list[Any]], Sequence[Any]]  # items -> one result per item, in order
MAX_RETRY_AFTER = 60  # seconds: a longer Retry-After would only park clients that could come back sooner


class Overloaded(Exception):
    """The server cannot take this request now (answered 503); ``retry_after``: seconds a client should wait."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QueueFull(Overloaded):
    """The queue already holds ``max_queue`` windows; nothing of the request was queued."""


class QueueTimeout(Overloaded):
    """The request waited longer than ``max_queue_ms`` for a model pass; its queued inputs were dropped."""


class BatcherClosed(Exception):
    """The server is shutting down, or its model worker stopped: it takes no new inputs (answered 503)."""


@dataclass(eq=False)
class _Request:
    """One ``submit``: its inputs not yet in a pass (index, item, windows) and one future for all its results."""

    queued: collections.deque
    results: list[Any]
    future: asyncio.Future
    arrived: float  # loop time
    queued_windows: int
    remaining: int = field(init=False)  # results still to come
    expiry: asyncio.TimerHandle | None = None

    def __post_init__(self) -> None:
        self.remaining = len(self.results)


@dataclass
class _Failed:
    error: Exception


class MicroBatcher(Generic[Item]):
    """``await submit(items, windows)`` -> their results in order, computed by ``predict`` in micro-batches.

    ``predict`` receives a list of items (of any requests) worth at most ``max_batch`` windows (or one item, when
    a single item is worth more) and returns one result per item. If it raises, the batch is bisected until the
    input that fails is alone, so one bad input fails its own request only and costs about 2 log2(batch) passes.
    ``on_batch(windows, seconds)`` is called on the event loop after every pass (metrics).
    """

    def __init__(self, predict: PredictFn, max_batch: int = 32, max_wait_ms: float = 5.0, max_queue: int = 1024,
                 on_batch: Callable[[int, float], None] | None = None, max_queue_ms: float = 0.0,
                 max_pass_seconds: float = 0.0) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0 or max_queue_ms < 0 or max_pass_seconds < 0:
            raise ValueError("max_batch and max_queue must be at least 1, the times at least 0")
        self.predict, self.max_batch, self.max_wait, self.max_queue = predict, max_batch, max_wait_ms / 1000, max_queue
        self.max_queue_wait = max_queue_ms / 1000  # 0: requests wait as long as it takes
        self.max_pass_seconds = max_pass_seconds  # 0: no pass is ever reported as stuck
        self.on_batch = on_batch
        self.in_flight = 0  # windows in the pass now running
        self._requests: collections.deque[_Request] = collections.deque()  # with inputs queued, in serving order
        self._active: set[_Request] = set()  # not answered yet: queued or in a pass
        self._depth = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="multitask-model")
        self._collector: asyncio.Task | None = None
        self._arrived: asyncio.Event | None = None
        self._refusing = False  # shutting down: no new requests
        self._closing = False
        self._stopped: str | None = None  # why the collector died
        self._pass_started: float | None = None  # monotonic time of the running pass
        self._reported_pass: float | None = None
        self._rate: float | None = None  # windows per second over recent passes

    @property
    def depth(self) -> int:
        """Windows waiting for a model pass (not counting the pass running)."""
        return self._depth

    def start(self) -> None:
        """Start collecting on the running event loop (``submit`` does it on first use)."""
        if self._collector is None:
            self._arrived = asyncio.Event()
            self._collector = asyncio.get_running_loop().create_task(self._collect(), name="multitask-batcher")
            self._collector.add_done_callback(self._collector_done)

    async def submit(self, items: Sequence[Item], windows: Sequence[int] | None = None) -> list[Any]:
        """Results of ``items`` in order (``windows``: each item's cost, default 1). Raises QueueFull (nothing was
        queued), QueueTimeout, BatcherClosed, or the error of the first item whose prediction failed."""
        if self._stopped is not None:
            raise BatcherClosed(self._stopped)
        if self._refusing:
            raise BatcherClosed("the server is shutting down")
        if not items:
            return []
        costs = [1] * len(items) if windows is None else [max(1, int(w)) for w in windows]
        if self._depth >= self.max_queue:
            raise QueueFull(f"the queue is full ({self._depth:,} windows waiting, at most {self.max_queue:,}); "
                            f"retry later", self.retry_after())
        self.start()
        loop = asyncio.get_running_loop()
        request = _Request(collections.deque(zip(range(len(items)), items, costs)), [None] * len(items),
                           loop.create_future(), loop.time(), sum(costs))
        self._requests.append(request)
        self._active.add(request)
        self._depth += request.queued_windows
        if self.max_queue_wait:
            request.expiry = loop.call_later(self.max_queue_wait, self._expire, request)
        self._arrived.set()
        try:
            return await request.future
        finally:  # answered, failed, or cancelled by a client that went away: nothing of it stays queued
            self._settle(request)

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained at the measured rate, with jitter so that refused clients do
        not all come back at once; 1 before any pass was measured."""
        if not self._rate:
            return 1
        drain = (self._depth + self.in_flight) / self._rate
        return max(1, min(MAX_RETRY_AFTER, math.ceil(drain * random.uniform(1.0, 1.5))))

    def problem(self) -> str | None:
        """Why this batcher cannot answer requests now (its worker stopped, or a pass is stuck), or None."""
        if self._stopped is not None:
            return self._stopped
        started = self._pass_started
        if started is None or not self.max_pass_seconds:
            return None
        running = time.monotonic() - started
        if running <= self.max_pass_seconds:
            return None
        if self._reported_pass != started:
            self._reported_pass = started
            log.warning("a model pass has run for %.1f s, over --max-pass-seconds (%g)", running, self.max_pass_seconds)
        return f"a model pass has run for {running:.0f} s, over --max-pass-seconds ({self.max_pass_seconds:g})"

    def stop_taking(self) -> None:
        """Refuse new requests (shutting down); those queued or in a pass go on."""
        self._refusing = True

    def abort(self, error: Exception) -> None:
        """Fail every request not answered yet with ``error`` and empty the queue; a pass running finishes unread."""
        for request in list(self._active):
            self._fail(request, error)

    async def close(self) -> None:
        """Take no more inputs, finish every queued one, then stop the worker thread."""
        self._refusing = self._closing = True
        if self._collector is not None and not self._collector.done():
            self._arrived.set()
            await self._collector
        self._executor.shutdown(wait=True)

    # ---- requests leaving
    def _settle(self, request: _Request) -> None:
        if request.expiry is not None:
            request.expiry.cancel()
        if request.queued:
            self._depth -= request.queued_windows
            request.queued.clear()
            request.queued_windows = 0
            self._requests.remove(request)
        self._active.discard(request)

    def _fail(self, request: _Request, error: Exception) -> None:
        if not request.future.done():
            request.future.set_exception(error)
        self._settle(request)

    def _expire(self, request: _Request) -> None:
        if request.queued:
            waited = asyncio.get_running_loop().time() - request.arrived
            self._fail(request, QueueTimeout(f"waited {waited * 1000:,.0f} ms for a model pass, over this server's "
                                             f"limit of {self.max_queue_wait * 1000:,.0f} ms; retry later",
                                             self.retry_after()))

    def _collector_done(self, task: asyncio.Task) -> None:
        error = None if task.cancelled() else task.exception()
        if not task.cancelled() and error is None:
            return  # closed normally
        self._stopped = (f"the model worker stopped ({type(error).__name__}: {error}); the server needs a restart"
                         if error is not None else "the model worker was cancelled; the server needs a restart")
        log.error("%s", self._stopped, exc_info=error)
        self.abort(BatcherClosed(self._stopped))

    # ---- the collector
    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._requests:
                if self._closing:
                    return
                self._arrived.clear()
                await self._arrived.wait()
                continue
            deadline = min(request.arrived for request in self._requests) + self.max_wait
            while self._depth < self.max_batch and not self._closing:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11 on
                    break
            batch = self._take()
            if batch:
                await self._run(batch)

    def _take(self) -> list[tuple[_Request, int, Any, int]]:
        """Up to ``max_batch`` windows, one input of each queued request in turn (always at least one input)."""
        batch: list[tuple[_Request, int, Any, int]] = []
        budget = self.max_batch
        while self._requests and budget > 0:
            request = self._requests[0]
            index, item, windows = request.queued[0]
            if batch and windows > budget:
                break
            request.queued.popleft()
            request.queued_windows -= windows
            self._depth -= windows
            budget -= windows
            batch.append((request, index, item, windows))
            self._requests.rotate(-1)  # its next input waits for every other request's turn
            if not request.queued:
                self._requests.pop()
                if request.expiry is not None:
                    request.expiry.cancel()
        return batch

    async def _run(self, batch: list[tuple[_Request, int, Any, int]]) -> None:
        loop = asyncio.get_running_loop()
        windows = sum(cost for *_, cost in batch)
        self.in_flight, self._pass_started = windows, time.monotonic()
        started = time.perf_counter()
        try:
            outcomes = await loop.run_in_executor(self._executor, self._predict_bisecting, [b[2] for b in batch])
        except Exception as error:  # the executor itself failed: nothing of this batch can be answered
            log.exception("model pass failed")
            outcomes = [_Failed(error)] * len(batch)
        finally:
            self.in_flight, self._pass_started = 0, None
        seconds = time.perf_counter() - started
        if seconds > 0:
            rate = windows / seconds
            self._rate = rate if self._rate is None else 0.7 * self._rate + 0.3 * rate
        if self.on_batch is not None:
            try:
                self.on_batch(windows, seconds)
            except Exception:  # a metrics bug must not stop the collector, or every later request would hang
                log.exception("on_batch failed")
        for (request, index, _, _), outcome in zip(batch, outcomes):
            if request.future.done():
                continue  # failed, timed out or withdrawn meanwhile
            if isinstance(outcome, _Failed):
                self._fail(request, outcome.error)
                continue
            request.results[index] = outcome
            request.remaining -= 1
            if request.remaining == 0:
                request.future.set_result(request.results)
                self._settle(request)

    def _predict_bisecting(self, items: list[Any]) -> list[Any]:
        """In the worker thread: the batch's results, or, when the pass fails, each half's, down to the input that
        fails alone (its error is its result)."""
        try:
            results = list(self.predict(items))
            if len(results) != len(items):
                raise RuntimeError(f"predict returned {len(results)} results for {len(items)} inputs")
            return results
        except Exception as error:
            if len(items) == 1:
                return [_Failed(error)]
        middle = len(items) // 2
        return self._predict_bisecting(items[:middle]) + self._predict_bisecting(items[middle:])
