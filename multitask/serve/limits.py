"""What one request may ask of the server: body size (413), number of inputs and characters per input (422).
They bound the memory and the model time a single client can take."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from multitask.errors import ConfigError, DataError


class LimitExceeded(DataError):
    """A request within the body limit asks for more than this server allows (answered 422)."""


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int = 2 << 20
    max_inputs: int = 256  # model inputs per request: /v1/analyze counts texts x tasks
    max_input_chars: int = 20_000  # every string of one input together (a SQuAD context is up to ~4,000)

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_inputs", "max_input_chars"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")

    def check_count(self, count: int, detail: str = "") -> None:
        if count > self.max_inputs:
            raise LimitExceeded(f"{count:,} inputs{detail} in one request, over this server's limit of "
                                f"{self.max_inputs:,}; split the request")

    def check_input(self, raw: Any, where: str) -> None:
        chars = input_chars(raw)
        if chars > self.max_input_chars:
            raise LimitExceeded(f"{where}: {chars:,} characters, over this server's limit of "
                                f"{self.max_input_chars:,} per input")


def input_chars(raw: Any) -> int:
    """Characters of every string in a JSON value: text + text_pair, question + context, all tokens."""
    if isinstance(raw, str):
        return len(raw)
    if isinstance(raw, dict):
        return sum(input_chars(value) for value in raw.values())
    if isinstance(raw, list):
        return sum(input_chars(value) for value in raw)
    return 0


class BodySizeLimit:
    """413 for a body over ``max_bytes``: at once when its Content-Length says so, else as soon as the streamed
    bytes pass the limit (the route is reading it then, so FastAPI answers the HTTPException). FastAPI's own
    ``max_body_size`` answers the first case in plain text; every error here is JSON with a ``detail``."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes
        self.detail = f"request body over this server's limit of {max_bytes:,} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await JSONResponse({"detail": self.detail}, status_code=413)(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, self.detail)
            return message

        await self.app(scope, limited, send)
