"""Request-size bound and clean shutdown for the HTTP app.

`BodyLimit` is a pure-ASGI middleware, outermost, so nothing (the gateway's rate-limit body
read included) ever holds more than `max_body_bytes` of one request: a declared
`Content-Length` over the limit is refused at once, before any byte of the body is read; a
chunked body is read up to the limit and refused as soon as it goes over. Either way the
answer is a 413 in OpenAI's error shape, sent before any JSON parsing. A path may have its own
limit (`path_limits`, e.g. file uploads): such bodies are streamed through and counted, never
buffered here, so a large upload is not held in memory.

`lifespan` starts the fine-tuning job runner and the batch runner (when the app has them) and
closes them and what the app was handed when the server stops: the batch runner first (its
asyncio task; unfinished batches resume at the next start), then the job runner (its worker
process), the engine client (its model thread) and the response store (the SQLite connection).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 8 << 20  # 8 MiB: far beyond any context window's worth of JSON

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def too_large_body(limit: int) -> bytes:
    return json.dumps({"error": {
        "message": f"The request body is larger than this server's limit of {limit} bytes.",
        "type": "invalid_request_error", "param": None, "code": "request_too_large"}}).encode()


class BodyLimit:
    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]],
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 path_limits: Mapping[str, int] | None = None) -> None:
        self.app, self.limit = app, int(max_body_bytes)
        # A path's own limit applies to it and to everything under it ("/v1/files/...").
        self.path_limits = {p.rstrip("/"): int(n) for p, n in (path_limits or {}).items()}

    def _limit_for(self, path: str) -> int | None:
        for prefix, limit in self.path_limits.items():
            if path == prefix or path.startswith(prefix + "/"):
                return limit
        return None

    async def _refuse(self, send: Send, limit: int) -> None:
        raw = too_large_body(limit)
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(raw)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": raw})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = None
        for k, v in scope.get("headers", []):
            if k.lower() == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    declared = None
                break
        own = self._limit_for(scope["path"])
        limit = self.limit if own is None else own
        if declared is not None and declared > limit:
            await self._refuse(send, limit)
            return
        if (declared is not None or own is not None
                or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE")):
            # Bounded by its declared length (the server enforces it), bodiless by use, or a
            # path with its own limit (an upload: its route checks sizes): count anyway, so a
            # lying client cannot stream past the limit.
            await self.app(scope, self._counting(receive, limit), send)
            return
        # Chunked: read it all (at most the limit), then hand it on.
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return  # the client went away
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(send, self.limit)
                return
            chunks.append(chunk)
            if not msg.get("more_body"):
                break
        await self.app(scope, replay_body(b"".join(chunks), receive), send)

    def _counting(self, receive: Receive, limit: int) -> Receive:
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:  # more than declared and allowed: treat as gone
                    return {"type": "http.disconnect"}
            return msg
        return counted


def replay_body(body: bytes, receive: Receive) -> Receive:
    """A `receive` that first hands back `body` (already read), then defers to `receive`."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replay


def lifespan_for(state: Any) -> Callable[[FastAPI], Any]:
    """A FastAPI lifespan that starts `state.jobs` (the fine-tuning runner, when set) and
    `state.batches` (the batch runner), and closes them, the engine client and the response
    store on shutdown (uvicorn runs it after it has stopped accepting and drained or cancelled
    open requests)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        start = getattr(getattr(state, "jobs", None), "start", None)
        if start is not None:
            start()
        batches = getattr(state, "batches", None)
        if batches is not None:  # an asyncio task on this loop
            await batches.astart()
        yield
        if batches is not None:  # first: its lines in flight use the engine
            try:
                await batches.aclose()
            except Exception:  # noqa: BLE001 - shut the rest down regardless
                log.exception("closing the batch runner failed")
        for name in ("jobs", "engine", "store"):
            close = getattr(getattr(state, name, None), "close", None)
            if close is None:
                continue
            try:
                close()
            except Exception:  # noqa: BLE001 - shut the rest down regardless
                log.exception("closing the %s failed", name)
    return lifespan
