"""Cross-request micro-batching.

Requests hand their inputs to one queue; a collector task on the event loop takes up to ``max_batch`` of them
per model pass, waiting at most ``max_wait_ms`` after the oldest arrived for more to join, and runs the pass in
ONE worker thread, so torch is never called concurrently and the event loop stays free to accept requests while
the model works. Inputs that arrive during a pass wait for the next one, whose window has then usually expired:
under load, batches fill up without any added wait.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Generic, Sequence, TypeVar

log = logging.getLogger(__name__)

Item = TypeVar("Item")
PredictFn = Callable[[list[Any]], Sequence[Any]]  # items -> one result per item, in order


class QueueFull(Exception):
    """The queue already holds ``max_queue`` inputs: the caller should answer 503 and the client retry later."""


class BatcherClosed(Exception):
    """The server is shutting down and takes no new inputs."""


@dataclass
class _Pending:
    item: Any
    future: asyncio.Future
    arrived: float  # loop time


@dataclass
class _Failed:
    error: Exception


class MicroBatcher(Generic[Item]):
    """``await submit(items)`` -> their results in order, computed by ``predict`` in micro-batches.

    ``predict`` receives a list of at most ``max_batch`` items (of any requests) and returns one result per item.
    If it raises, each item of that batch is run again on its own, so one bad input fails its own request only.
    ``on_batch(size, seconds)`` is called on the event loop after every pass (metrics).
    """

    def __init__(self, predict: PredictFn, max_batch: int = 32, max_wait_ms: float = 5.0, max_queue: int = 1024,
                 on_batch: Callable[[int, float], None] | None = None) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch and max_queue must be at least 1 and max_wait_ms at least 0")
        self.predict, self.max_batch, self.max_wait, self.max_queue = predict, max_batch, max_wait_ms / 1000, max_queue
        self.on_batch = on_batch
        self.in_flight = 0  # inputs in the pass now running
        self._queue: collections.deque[_Pending] = collections.deque()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="multitask-model")
        self._collector: asyncio.Task | None = None
        self._arrived: asyncio.Event | None = None
        self._closing = False

    @property
    def depth(self) -> int:
        """Inputs waiting for a model pass (not counting the one running)."""
        return len(self._queue)

    def start(self) -> None:
        """Start collecting on the running event loop (``submit`` does it on first use)."""
        if self._collector is None:
            self._arrived = asyncio.Event()
            self._collector = asyncio.get_running_loop().create_task(self._collect(), name="multitask-batcher")

    async def submit(self, items: Sequence[Item]) -> list[Any]:
        """Results of ``items`` in order. Raises QueueFull (nothing was queued) or BatcherClosed, or the error of
        the first item whose prediction failed."""
        if self._closing:
            raise BatcherClosed("the server is shutting down")
        if len(self._queue) + len(items) > self.max_queue:
            raise QueueFull(f"the queue is full ({len(self._queue)} inputs waiting, at most {self.max_queue}); "
                            f"retry later")
        if not items:
            return []
        self.start()
        loop = asyncio.get_running_loop()
        now = loop.time()
        pending = [_Pending(item, loop.create_future(), now) for item in items]
        self._queue.extend(pending)
        self._arrived.set()
        # A client that goes away cancels this await; its futures are cancelled too and the collector skips them.
        outcomes = await asyncio.gather(*(p.future for p in pending), return_exceptions=True)
        failed = next((o for o in outcomes if isinstance(o, BaseException)), None)
        if failed is not None:
            raise failed
        return outcomes

    async def close(self) -> None:
        """Take no more inputs, finish every queued one, then stop the worker thread."""
        self._closing = True
        if self._collector is not None:
            self._arrived.set()
            await self._collector
        self._executor.shutdown(wait=True)

    # ---- the collector
    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._arrived.clear()
                await self._arrived.wait()
                continue
            deadline = self._queue[0].arrived + self.max_wait
            while len(self._queue) < self.max_batch and not self._closing:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11 on
                    break
            batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
            batch = [p for p in batch if not p.future.done()]  # cancelled by a client that left
            if batch:
                await self._run(batch)

    async def _run(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        self.in_flight = len(batch)
        started = time.perf_counter()
        try:
            outcomes = await loop.run_in_executor(self._executor, self._predict_isolating, [p.item for p in batch])
        except Exception as error:  # the executor itself failed: nothing of this batch can be answered
            log.exception("model pass failed")
            outcomes = [_Failed(error)] * len(batch)
        finally:
            self.in_flight = 0
        if self.on_batch is not None:
            try:
                self.on_batch(len(batch), time.perf_counter() - started)
            except Exception:  # a metrics bug must not stop the collector, or every later request would hang
                log.exception("on_batch failed")
        for pending, outcome in zip(batch, outcomes):
            if pending.future.done():
                continue
            if isinstance(outcome, _Failed):
                pending.future.set_exception(outcome.error)
            else:
                pending.future.set_result(outcome)

    def _predict_isolating(self, items: list[Any]) -> list[Any]:
        """In the worker thread: the batch's results, or, when it fails, each item's own result or error."""
        try:
            results = list(self.predict(items))
            if len(results) != len(items):
                raise RuntimeError(f"predict returned {len(results)} results for {len(items)} inputs")
            return results
        except Exception as error:
            if len(items) == 1:
                return [_Failed(error)]
        return [self._predict_isolating([item])[0] for item in items]
