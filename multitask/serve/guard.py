"""The checks every request passes before any route reads its body: the Host header, the API or admin key, and a
deadline on reading the body.

They are pure ASGI, ahead of FastAPI, so a request without the key costs a header lookup: its body is never read
or parsed (malformed JSON without the key is a 401, not a 422). The Host check keeps a keyless server on loopback
out of reach of DNS rebinding (a web page whose own name resolves to 127.0.0.1). The body deadline frees the
connection of a client that sends its body a byte at a time.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path
from typing import Iterable

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from multitask.errors import ConfigError

# Readable without the key (/health then says only whether the server is up).
PUBLIC_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/openapi.json"})
ADMIN_PREFIX = "/v1/admin/"
CALLER = "multitask.caller"  # scope key: "admin", "user" (holds the key, or none is needed) or None
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def check_key(key: str | None, option: str) -> None:
    """A key must be one a client can send: an HTTP header carries printable ASCII, so any other key never matches."""
    if key is None:
        return
    if not key.strip():
        raise ConfigError(f"{option} is empty")
    if not key.isascii() or not key.isprintable() or any(char.isspace() for char in key):
        raise ConfigError(f"{option}: the key must be printable ASCII without spaces (an HTTP header carries "
                          f"nothing else, so no client could send it)")


def read_key(given: str | None, path: str | None, variable: str, option: str) -> str | None:
    """The key from ``--OPTION``, ``--OPTION-file`` or the environment variable, in that order; the file and the
    variable keep it out of ``ps``."""
    if given is not None and path is not None:
        raise ConfigError(f"give {option} or {option}-file, not both")
    if path is not None:
        try:
            return Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"{option}-file {path}: cannot be read ({error})") from None
    if given is not None:
        return given
    return os.environ.get(variable)


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def allowed_hosts(option: str | None, bind_host: str) -> tuple[str, ...] | None:
    """The Host names to serve (None: any) from ``--allowed-hosts`` (comma-separated, or '*'); by default a server
    bound to loopback answers loopback names only, and one bound beyond it any name (its public names are unknown
    here: name them, or let the reverse proxy check them)."""
    if option is None:
        return (*LOOPBACK_HOSTS, bind_host) if is_loopback(bind_host) else None
    names = tuple(name.strip().lower() for name in option.split(",") if name.strip())
    if not names:
        raise ConfigError("--allowed-hosts is empty; give host names, or '*' for any")
    return None if "*" in names else names


def host_name(header: str) -> str:
    """The name in a Host header, without its port (``[::1]:8080`` -> ``::1``)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def _bearer(headers: dict[bytes, bytes]) -> bytes:
    scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else b""


def _answer(status: int, detail: str, bearer: bool = False) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if bearer else None
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


class Guard:
    """Host, key and body deadline, in that order. ``admin_key`` None: /v1/admin/* answers 403."""

    def __init__(self, app: ASGIApp, api_key: str | None, admin_key: str | None,
                 allowed_hosts: Iterable[str] | None, body_timeout: float) -> None:
        self.app, self.body_timeout = app, body_timeout
        self.api_key = api_key.encode() if api_key is not None else None
        self.admin_key = admin_key.encode() if admin_key is not None else None
        self.allowed_hosts = None if allowed_hosts is None else frozenset(h.lower() for h in allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal, scope[CALLER] = self._refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, self._with_deadline(receive), send)

    def _refusal(self, scope: Scope) -> tuple[JSONResponse | None, str | None]:
        headers = dict(scope["headers"])
        if self.allowed_hosts is not None:
            name = host_name(headers.get(b"host", b"").decode("latin-1"))
            if name not in self.allowed_hosts:
                shown = ascii(name[:100])
                return _answer(400, f"host {shown} is not served here; start the server with --allowed-hosts naming "
                                    f"it (or '*' for any)"), None
        path, token = scope["path"], _bearer(headers)
        if path.startswith(ADMIN_PREFIX):
            if self.admin_key is None:
                return _answer(403, "admin endpoints are off: start the server with --admin-key"), None
            if not secrets.compare_digest(token, self.admin_key):
                return _answer(401, "missing or wrong admin key: send the header 'Authorization: Bearer <admin key>'",
                               bearer=True), None
            return None, "admin"
        if self.api_key is None or secrets.compare_digest(token, self.api_key):
            return None, "user"
        if self.admin_key is not None and secrets.compare_digest(token, self.admin_key):
            return None, "admin"
        if path in PUBLIC_PATHS:
            return None, None
        return _answer(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                       bearer=True), None

    def _with_deadline(self, receive: Receive) -> Receive:
        """``receive`` that answers 408 unless the whole body has arrived ``body_timeout`` seconds after the request
        began (the route is reading it then, so FastAPI answers the HTTPException); later calls (waiting for a
        disconnect) have no deadline."""
        loop = asyncio.get_running_loop()
        deadline, complete = loop.time() + self.body_timeout, False

        async def receive_body() -> Message:
            nonlocal complete
            if complete:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise HTTPException(408, f"the request body did not arrive within {self.body_timeout:g} s",
                                    headers={"Connection": "close"}) from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        return receive_body
