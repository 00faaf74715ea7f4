"""The request gateway: API keys, rate limits, metrics, the access log and request ids.

One pure-ASGI middleware (`Gateway`) runs in front of every route, in this order:
request id -> API key (every path but /health, and /metrics when it is public) -> rate limits
(the generation endpoints) -> the route -> release + usage reconciliation -> metrics and one
JSON log line on the `ossrt.access` logger. The batch runner's in-process calls carry the
process's `state.internal_secret` in x-ossrt-internal: they skip the key and the rate limits
and are booked to the batch's owner (key id and tier).

Auth is on when a static key is configured (`--api-key`) or the key store holds a live key;
with neither, every request is let through as the `anonymous` principal (and `ossrt serve`
keeps such a server on loopback unless told otherwise).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request, Response

from .errors import APIError
from .keys import KeyStore
from .limits import replay_body
from .metrics import Metrics, RequestRecord, current_request, usage_from_api, usage_from_sse
from .ratelimit import RateLimiter, estimate_cost, load_tiers

if TYPE_CHECKING:
    from .state import ServerState

log = logging.getLogger("ossrt.access")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
                   Awaitable[None]]

DEFAULT_TIER = "default"
PUBLIC_PATHS = frozenset({"/health"})
# Rate-limited (requests, tokens, concurrency) POST endpoints: the ones that run the model.
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"})
KNOWN_PATHS = GENERATION_PATHS | {"/v1/models", "/metrics", "/health"}  # metric labels
# The batch runner's in-process calls (see batches.py): the state's secret, and the owner.
INTERNAL_HEADER = "x-ossrt-internal"
OWNER_KEY_HEADER = "x-ossrt-batch-owner"
OWNER_TIER_HEADER = "x-ossrt-batch-tier"
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
MAX_USAGE_BODY = 1 << 22  # non-streamed bodies longer than this are not parsed for usage


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str
    tier: str


ANONYMOUS = Principal("anonymous", DEFAULT_TIER)


def _mask(key: str) -> str:
    return f"{key[:3]}***{key[-4:]}" if len(key) > 10 else "***"


class Authenticator:
    """Checks `Authorization: Bearer KEY` against static keys and the key store."""

    def __init__(self, static_keys: dict[str, str] | None = None,
                 store: KeyStore | None = None) -> None:
        self.static = dict(static_keys or {})  # key -> tier
        self.store = store

    def enabled(self) -> bool:
        return bool(self.static) or (self.store is not None and self.store.num_active() > 0)

    def check(self, authorization: str | None) -> Principal:
        """The caller, or APIError(401). With auth off, everyone is ANONYMOUS."""
        scheme, _, key = (authorization or "").partition(" ")
        key = key.strip() if scheme.lower() == "bearer" else ""
        if key:
            for i, (known, tier) in enumerate(self.static.items()):
                if hmac.compare_digest(known.encode(), key.encode()):
                    return Principal(f"api-key-{i}", tier)
            rec = self.store.lookup(key) if self.store is not None else None
            if rec is not None:
                return Principal(rec.id, rec.tier)
        if not self.enabled():
            return ANONYMOUS
        if not key:
            msg = ("Incorrect API key provided: none was given. Send it in the Authorization "
                   "header as 'Bearer sk-...' (keys come from `ossrt keys create` or --api-key).")
        else:
            msg = (f"Incorrect API key provided: {_mask(key)}. Keys come from "
                   "`ossrt keys create` or the server's --api-key.")
        raise APIError(401, msg, code="invalid_api_key")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def configure(*, api_key: str | None, rate_limits: str | None, data_dir: Path, host: str,
              allow_unauthenticated: bool = False
              ) -> tuple[Authenticator, RateLimiter | None, str]:
    """For `ossrt serve`: (authenticator, rate limiter, banner line). Raises ValueError when a
    server without keys would listen beyond loopback and that was not explicitly allowed."""
    auth = Authenticator({api_key: DEFAULT_TIER} if api_key else None, KeyStore(data_dir))
    limiter = RateLimiter(load_tiers(rate_limits)) if rate_limits else None
    if auth.enabled():
        n = auth.store.num_active() if auth.store else 0
        banner = (f"auth ON: {'--api-key' if api_key else ''}{' + ' if api_key and n else ''}"
                  f"{f'{n} key(s) in {auth.store.path}' if n and auth.store else ''}")
    elif is_loopback(host) or allow_unauthenticated:
        banner = ("auth OFF: no --api-key and no keys (`ossrt keys create`): anyone who can reach "
                  f"{host} can use this server")
    else:
        raise ValueError(f"refusing to serve on {host} without API keys: anyone on the network "
                         "could use it. Pass --api-key KEY, create keys with `ossrt keys create`, "
                         "bind to 127.0.0.1, or pass --allow-unauthenticated.")
    if limiter:
        banner += f"; rate-limit tiers: {', '.join(limiter.tiers)}"
    return auth, limiter, banner


def _error(status: int, body: dict, headers: dict[str, str]) -> tuple[Message, Message]:
    raw = json.dumps(body).encode()
    hs = [(k.encode(), v.encode()) for k, v in headers.items()]
    return ({"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(raw)).encode()), *hs]},
            {"type": "http.response.body", "body": raw})


class Gateway:
    """The pure-ASGI middleware (pure, so streams pass through untouched and the context
    variable the routes' `record_usage` reads is visible to them)."""

    def __init__(self, app: ASGIApp, state: ServerState, metrics: Metrics) -> None:
        self.app, self.state, self.metrics = app, state, metrics
        self._static_paths: frozenset[str] | None = None

    def _endpoint(self, scope: Scope) -> str:
        route = scope.get("route")
        if route is not None and getattr(route, "path", None):
            return route.path
        if self._static_paths is None:  # refused before routing: a known path, else a bucket
            self._static_paths = KNOWN_PATHS | frozenset(
                p for r in getattr(scope.get("app"), "routes", [])
                if "{" not in (p := getattr(r, "path", None) or "{"))
        return scope["path"] if scope["path"] in self._static_paths else "unmatched"

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        rid = headers.get("x-request-id", "")
        if not REQUEST_ID.match(rid):
            rid = f"req_{uuid.uuid4().hex}"
        rec = RequestRecord(request_id=rid, method=scope["method"], path=scope["path"],
                            start=time.perf_counter())
        token = current_request.set(rec)
        try:
            await self._handle(scope, receive, send, headers, rec)
        except BaseException:
            rec.status = rec.status or 500  # raised before answering: the server's 500
            raise
        finally:
            current_request.reset(token)
            self._record(scope, rec)

    def _record(self, scope: Scope, rec: RequestRecord) -> None:
        """Metrics and the log line, once per request: just before the response's last body
        message goes out (so a client that has its answer sees it counted), or at the end."""
        if rec.extra.get("recorded"):
            return
        rec.extra["recorded"] = True
        end = time.perf_counter()
        self.metrics.observe(rec, self._endpoint(scope), end)
        log.info(json.dumps({"request_id": rec.request_id, "method": rec.method,
                             "path": rec.path, "status": rec.status,
                             "duration_ms": round((end - rec.start) * 1000, 2),
                             "tier": rec.tier, "key_id": rec.key_id}))

    async def _handle(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                      send: Callable[[Message], Awaitable[None]], headers: dict[str, str],
                      rec: RequestRecord) -> None:
        extra = {"x-request-id": rec.request_id}

        async def refuse(status: int, body: dict, more: dict[str, str] | None = None) -> None:
            rec.status = status
            start, body_msg = _error(status, body, {**extra, **(more or {})})
            await send(start)
            self._record(scope, rec)
            await send(body_msg)

        path = scope["path"]
        needs_key = path not in PUBLIC_PATHS and not (path == "/metrics"
                                                      and self.state.metrics_public)
        principal = ANONYMOUS
        internal = self._internal(headers)
        if internal is not None:  # the batch runner's own call: its batch's owner, no limits
            principal = internal
        elif needs_key and self.state.auth is not None:
            try:
                principal = self.state.auth.check(headers.get("authorization"))
            except APIError as exc:
                self.metrics.auth_failures.inc()
                await refuse(exc.status, exc.body())
                return
        rec.tier, rec.key_id = principal.tier, principal.key_id

        limiter = self.state.rate_limits
        limited = (internal is None and limiter is not None and scope["method"] == "POST"
                   and path in GENERATION_PATHS and limiter.tier(principal.tier) is not None)
        charged = 0
        if limited:
            assert limiter is not None
            body = b""
            while True:  # read the whole body to estimate its tokens, then replay it
                msg = await receive()
                if msg["type"] != "http.request":
                    break
                body += msg.get("body", b"")
                if not msg.get("more_body"):
                    break
            receive = replay_body(body, receive)
            try:
                parsed = json.loads(body) if body else None
            except ValueError:
                parsed = None  # the route answers 400
            cost = estimate_cost(path, parsed, self._count_tokens)
            decision = limiter.admit(principal.key_id, principal.tier, cost)
            if not decision.allowed:
                self.metrics.rate_limited.labels(decision.kind, principal.tier).inc()
                await refuse(429, {"error": {"message": decision.message, "type": decision.kind,
                                             "param": None, "code": "rate_limit_exceeded"}},
                             decision.headers)
                return
            extra.update(decision.headers)
            charged = decision.charged_tokens

        body_parts: list[bytes] = []
        body_len = 0
        settled = False

        def settle() -> None:
            """Usage (from the route's record_usage, else the body) and the limiter's release."""
            nonlocal settled
            if settled:
                return
            settled = True
            if rec.usage is None:
                if rec.streamed:
                    rec.usage = rec.extra.get("sse_usage")
                elif body_parts and body_len < MAX_USAGE_BODY:
                    try:
                        rec.usage = usage_from_api(json.loads(b"".join(body_parts)))
                    except ValueError:
                        rec.usage = None  # not JSON: no usage to count
            if limited:
                assert limiter is not None
                u = rec.usage
                actual = (u.prompt_tokens + u.output_tokens if u is not None
                          else 0 if rec.status >= 400 else None)
                limiter.release(principal.key_id, principal.tier, charged, actual)

        async def send_wrapped(msg: Message) -> None:
            nonlocal body_len
            if msg["type"] == "http.response.start":
                rec.status = msg["status"]
                hs = list(msg.get("headers", []))
                ctype = next((v for k, v in hs if k.lower() == b"content-type"), b"")
                rec.streamed = ctype.startswith(b"text/event-stream")
                hs += [(k.encode(), v.encode()) for k, v in extra.items()]
                msg = {**msg, "headers": hs}
            elif msg["type"] == "http.response.body":
                chunk = msg.get("body", b"")
                if chunk:
                    now = time.perf_counter()
                    rec.first_chunk = rec.first_chunk or now
                    rec.last_chunk = now
                    if rec.streamed:
                        rec.extra["sse_usage"] = usage_from_sse(chunk) or rec.extra.get(
                            "sse_usage")
                    elif path in GENERATION_PATHS and body_len < MAX_USAGE_BODY:
                        body_parts.append(chunk)
                        body_len += len(chunk)
                if not msg.get("more_body", False):
                    settle()
                    self._record(scope, rec)
            await send(msg)

        try:
            await self.app(scope, receive, send_wrapped)
        finally:
            settle()  # also when the client went away or the app raised

    def _internal(self, headers: dict[str, str]) -> Principal | None:
        """The batch owner an in-process call of the batch runner acts for: only when it
        carries this process's `state.internal_secret` exactly (compared in constant time);
        any other value of the header is ignored (the request then needs a key as usual)."""
        given = headers.get(INTERNAL_HEADER)
        secret = getattr(self.state, "internal_secret", None)
        if not given or not secret or not hmac.compare_digest(
                given.encode("latin-1"), secret.encode("latin-1")):
            return None
        return Principal(headers.get(OWNER_KEY_HEADER) or ANONYMOUS.key_id,
                         headers.get(OWNER_TIER_HEADER) or DEFAULT_TIER)

    def _count_tokens(self, text: str) -> int:
        return len(self.state.tokenizer.encode(text, allow_special=False))


def install(app: FastAPI, state: ServerState) -> Metrics:
    """Adds the gateway middleware and GET /metrics to the app."""
    metrics = Metrics(state.engine_stats)
    app.state.metrics = metrics
    app.add_middleware(Gateway, state=state, metrics=metrics)

    async def prometheus(_: Request) -> Response:
        data, ctype = metrics.render()
        return Response(data, media_type=ctype)
    app.add_api_route("/metrics", prometheus, methods=["GET"], include_in_schema=False)
    return metrics
