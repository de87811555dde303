"""Shutting down: /health turns not-ready the moment SIGTERM arrives, the work in flight gets until
--graceful-timeout to finish, and whatever cannot finish by then is answered 503 rather than cut off.

uvicorn tells an app about a shutdown only through the lifespan, after every connection has closed: too late for
/health, and by then uvicorn has already cancelled the requests still running (a 500 each). So the server here
hears the signal itself (:class:`ServingServer`), and :class:`Drain` answers what is left just before uvicorn's
own deadline; the model pass running then finishes in its thread and is waited for, so the process exits within
the timeout plus one pass.
"""

from __future__ import annotations

import asyncio
import logging
from types import FrameType
from typing import Callable

import uvicorn

from multitask.serve.batcher import BatcherClosed, MicroBatcher

log = logging.getLogger("multitask.serve")


class Drain:
    """The shutdown state of one app: ``begin()`` (from any thread, a signal handler included) starts it."""

    def __init__(self, batcher: MicroBatcher, timeout: float) -> None:
        self.batcher, self.timeout = batcher, timeout
        self.draining = False
        self.loop: asyncio.AbstractEventLoop | None = None  # the app's, set when it starts

    def begin(self) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._begin)

    def _begin(self) -> None:
        if self.draining:
            return
        self.draining = True
        self.batcher.stop_taking()
        log.info("shutting down: finishing the requests in flight (at most %g s)", self.timeout)
        # uvicorn cancels what still runs at least 0.1 s after the timeout; answer it shortly before.
        self.loop.call_later(max(0.0, self.timeout - min(0.25, self.timeout / 4)), self.batcher.abort,
                             BatcherClosed(f"the server shut down before this request could finish (within "
                                           f"--graceful-timeout, {self.timeout:g} s); retry on another replica"))


class ServingServer(uvicorn.Server):
    """uvicorn's server, telling ``on_exit`` the moment a shutdown signal arrives."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.on_exit()
        super().handle_exit(sig, frame)
