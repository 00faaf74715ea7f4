"""Prometheus metrics (one CollectorRegistry per app) and the per-request record behind them.

Token counts come from `record_usage(...)`, which a route calls once its usage is final (it finds
the current request through a context variable set by the gateway middleware; outside a request it
does nothing). Routes that do not call it are covered by reading the `usage` object out of the
response body: the JSON body, or for a stream the chunk / `response.completed` event that carries
it. Time to first token is the time to the first body chunk of a streamed response; time per
output token is (last chunk - first chunk) / (output tokens - 1) for streams and
duration / output tokens otherwise (an approximation: it includes the prompt for non-streams).
"""

from __future__ import annotations

import contextvars
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram,
                               generate_latest)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


@dataclass
class Usage:
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0


@dataclass
class RequestRecord:
    """What the gateway knows about one request while it runs."""

    request_id: str
    method: str
    path: str
    start: float
    tier: str = "none"
    key_id: str | None = None
    status: int = 0
    streamed: bool = False
    first_chunk: float | None = None
    last_chunk: float | None = None
    usage: Usage | None = None
    tool_calls: list[tuple[str, str]] = field(default_factory=list)  # (tool, ok | failed)
    extra: dict[str, Any] = field(default_factory=dict)


current_request: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar(
    "ossrt_request", default=None)


def record_usage(prompt_tokens: int, output_tokens: int, cached_tokens: int = 0,
                 reasoning_tokens: int = 0) -> None:
    """Hook for routes: the current request's final token usage (no-op outside a request)."""
    rec = current_request.get()
    if rec is not None:
        rec.usage = Usage(prompt_tokens, output_tokens, cached_tokens, reasoning_tokens)


def record_tool_call(tool: str, ok: bool) -> None:
    """Hook for the built-in tool loop: one call of `tool` ("browser", "python") ran."""
    rec = current_request.get()
    if rec is not None:
        rec.tool_calls.append((tool, "ok" if ok else "failed"))


def usage_from_api(obj: Any) -> Usage | None:
    """A Usage from any of the API's usage objects (chat/completions or responses shapes)."""
    if not isinstance(obj, dict):
        return None
    u = obj.get("usage")
    if not isinstance(u, dict) and isinstance(obj.get("response"), dict):
        u = obj["response"].get("usage")
    if not isinstance(u, dict):
        return None
    prompt_d = u.get("prompt_tokens_details") or u.get("input_tokens_details") or {}
    out_d = u.get("completion_tokens_details") or u.get("output_tokens_details") or {}
    return Usage(int(u.get("prompt_tokens", u.get("input_tokens", 0)) or 0),
                 int(u.get("completion_tokens", u.get("output_tokens", 0)) or 0),
                 int(prompt_d.get("cached_tokens", 0) or 0),
                 int(out_d.get("reasoning_tokens", 0) or 0))


def usage_from_sse(chunk: bytes) -> Usage | None:
    """The usage in a streamed body chunk, if it carries one."""
    if b'"usage"' not in chunk:
        return None
    found = None
    for line in chunk.split(b"\n"):
        if line.startswith(b"data:") and b'"usage"' in line:
            try:
                found = usage_from_api(json.loads(line[5:])) or found
            except ValueError:
                continue  # not JSON (e.g. [DONE]): no usage here
    return found


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], dict[str, float]]) -> None:
        self.stats = stats

    def collect(self) -> Iterable[GaugeMetricFamily]:
        for name, value in self.stats().items():
            yield GaugeMetricFamily(f"ossrt_engine_{name}", f"engine: {name.replace('_', ' ')}",
                                    value=float(value))


LATENCY_BUCKETS = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
TOKEN_TIME_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5)


class Metrics:
    def __init__(self, engine_stats: Callable[[], dict[str, float]] | None = None) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("ossrt_requests", "HTTP requests by endpoint, status, key tier",
                                ["endpoint", "status", "tier"], registry=r)
        self.tokens = Counter("ossrt_tokens", "tokens by kind (prompt, cached, reasoning, output)",
                              ["kind", "endpoint", "tier"], registry=r)
        self.rate_limited = Counter("ossrt_rate_limit_rejections",
                                    "requests refused by a rate limit", ["type", "tier"],
                                    registry=r)
        self.auth_failures = Counter("ossrt_auth_failures", "requests refused for a bad API key",
                                     registry=r)
        self.duration = Histogram("ossrt_request_duration_seconds", "request duration",
                                  ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("ossrt_time_to_first_token_seconds",
                              "streams: time to the first body chunk", ["endpoint"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("ossrt_time_per_output_token_seconds", "time per output token",
                              ["endpoint"], buckets=TOKEN_TIME_BUCKETS, registry=r)
        self.tool_calls = Counter("ossrt_tool_calls", "built-in tool calls by tool and outcome",
                                  ["tool", "outcome"], registry=r)
        if engine_stats is not None:
            r.register(_EngineCollector(engine_stats))

    def observe(self, rec: RequestRecord, endpoint: str, end: float) -> None:
        self.requests.labels(endpoint, str(rec.status), rec.tier).inc()
        self.duration.labels(endpoint).observe(end - rec.start)
        for tool, outcome in rec.tool_calls:
            self.tool_calls.labels(tool, outcome).inc()
        if rec.streamed and rec.first_chunk is not None and rec.status == 200:
            self.ttft.labels(endpoint).observe(rec.first_chunk - rec.start)
        u = rec.usage
        if u is None:
            return
        for kind, n in (("prompt", u.prompt_tokens), ("cached", u.cached_tokens),
                        ("reasoning", u.reasoning_tokens), ("output", u.output_tokens)):
            self.tokens.labels(kind, endpoint, rec.tier).inc(n)
        if rec.streamed and rec.first_chunk is not None and rec.last_chunk is not None:
            if u.output_tokens > 1:
                self.tpot.labels(endpoint).observe(
                    (rec.last_chunk - rec.first_chunk) / (u.output_tokens - 1))
        elif u.output_tokens > 0:
            self.tpot.labels(endpoint).observe((end - rec.start) / u.output_tokens)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
