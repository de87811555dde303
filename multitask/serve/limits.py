"""What one request may ask of the server: body size (413), number of inputs, characters and tokens per input (422).
They bound the memory and the model time a single client can take.

Characters are counted before anything else looks at an input, iteratively and with a depth cap, so no input can
make the count itself expensive or recursive; strings that UTF-8 cannot carry (lone surrogates, which JSON's
``\ud800`` escapes allow) are refused there too, before they reach a tokenizer. Tokens are counted after the task's
own featurization (:mod:`multitask.serve.windows`), because only it knows how many windows a long input becomes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from multitask.errors import ConfigError, DataError


class LimitExceeded(DataError):
    """A request within the body limit asks for more than this server allows (answered 422)."""


# Nesting an input may have: the task formats need 2 ({"tokens": [...]}); more is a client's mistake or an attack.
MAX_INPUT_DEPTH = 16


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int = 2 << 20
    max_inputs: int = 256  # model inputs per request: /v1/analyze counts texts x tasks
    max_input_chars: int = 20_000  # every string of one input together (a SQuAD context is up to ~4,000)
    # Tokens the model reads for one input over all its windows (a 4,000-character SQuAD context: ~1,500 in 4 windows
    # of 384); what bounds the model time of one input, which characters do not.
    max_input_tokens: int = 8192

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_inputs", "max_input_chars", "max_input_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")

    def check_count(self, count: int, detail: str = "") -> None:
        if count > self.max_inputs:
            raise LimitExceeded(f"{count:,} inputs{detail} in one request, over this server's limit of "
                                f"{self.max_inputs:,}; split the request")

    def check_input(self, raw: Any, where: str) -> None:
        chars = input_chars(raw, where)
        if chars > self.max_input_chars:
            raise LimitExceeded(f"{where}: {chars:,} characters, over this server's limit of "
                                f"{self.max_input_chars:,} per input")

    def check_tokens(self, tokens: int, windows: int, where: str) -> None:
        if tokens > self.max_input_tokens:
            raise LimitExceeded(f"{where}: {tokens:,} tokens in {windows:,} windows, over this server's limit of "
                                f"{self.max_input_tokens:,} tokens per input (--max-input-tokens); send it in parts")


def input_chars(raw: Any, where: str = "input") -> int:
    """Characters of a JSON value: every string (text + text_pair, question + context, all tokens), and any other
    scalar as it is written (a token sent as a number is still a token). DataError for a string UTF-8 cannot encode;
    LimitExceeded past MAX_INPUT_DEPTH levels of nesting."""
    total, stack = 0, [(raw, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            total += _checked_len(value, where)
        elif isinstance(value, (dict, list)):
            if depth >= MAX_INPUT_DEPTH:
                raise LimitExceeded(f"{where}: nested deeper than {MAX_INPUT_DEPTH} levels")
            stack.extend((item, depth + 1) for item in (value.values() if isinstance(value, dict) else value))
        elif value is not None:
            total += len(str(value))
    return total


def _checked_len(text: str, where: str) -> int:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            code = f"U+{ord(text[error.start]):04X}"
            raise DataError(f"{where}: a string holds a character UTF-8 cannot encode ({error.reason}, {code} at "
                            f"position {error.start}); send valid Unicode text") from None
    return len(text)


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
