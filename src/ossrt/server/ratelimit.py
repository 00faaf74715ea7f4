"""Per-key rate limits: requests and tokens per minute (token buckets), concurrent requests.

Algorithm: each key has two token buckets whose capacity is the per-minute limit and which refill
continuously at limit/60 per second (so a full minute's budget can be spent in a burst, then it
comes back smoothly), plus an in-flight counter. Admission checks all three and charges them in
one synchronous step under a lock, so it is exact under any concurrency.

Tokens are charged *conservatively at admission* and *reconciled when the response finishes*:
the charge is an estimate of the prompt (see `estimate_cost`) plus the request's maximum output
(times `n`); when the response's usage is known, the bucket is credited the difference between
that charge and the actual prompt + output tokens (which can also be a debit, when a request
without a max-tokens field produced more than the assumed default). A request that fails before
generating (4xx) is refunded its whole token charge; its request count stays spent.

Config: a TOML file with one `[tiers.NAME]` table per tier; a missing field is unlimited.
"""

from __future__ import annotations

import math
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Assumed output when a request gives no max-tokens field (chat, responses): reconciled later.
DEFAULT_OUTPUT_ESTIMATE = 1024
LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "max_concurrent_requests",
                "batch_queue_limit")


@dataclass(frozen=True, slots=True)
class Tier:
    name: str
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent_requests: int | None = None
    batch_queue_limit: int | None = None  # enqueued tokens of unfinished batches (batches.py)

    def __post_init__(self) -> None:
        for f in LIMIT_FIELDS:
            v = getattr(self, f)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise ValueError(f"tier {self.name!r}: {f} must be a non-negative integer, "
                                 f"not {v!r}")


def load_tiers(path: str | Path) -> dict[str, Tier]:
    """`[tiers.NAME]` tables from a TOML file. Raises ValueError on unknown fields or types."""
    with open(path, "rb") as f:
        try:
            data = tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: {exc}") from exc
    tiers = data.get("tiers")
    if not isinstance(tiers, dict) or not tiers:
        raise ValueError(f"{path}: expected one or more [tiers.NAME] tables")
    out = {}
    for name, table in tiers.items():
        if not isinstance(table, dict):
            raise ValueError(f"{path}: tiers.{name} must be a table")
        unknown = set(table) - set(LIMIT_FIELDS)
        if unknown:
            raise ValueError(f"{path}: tiers.{name}: unknown field(s) {sorted(unknown)}; "
                             f"expected {', '.join(LIMIT_FIELDS)}")
        out[name] = Tier(name=name, **table)
    return out


def estimate_cost(path: str, body: Any, count_tokens: Callable[[str], int]) -> int:
    """Tokens charged at admission: a prompt estimate (the tokenizer on every string in the
    request's input fields, plus 4 per message for the chat format) + max output x n."""
    if not isinstance(body, dict):
        return 0
    n = body.get("n") if isinstance(body.get("n"), int) and body.get("n", 0) > 0 else 1
    if path.endswith("/completions") and not path.endswith("/chat/completions"):
        max_out = body.get("max_tokens", 16)  # the legacy API's own default
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            prompt_tokens = len(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
            prompt_tokens, n = sum(len(p) for p in prompt), n * len(prompt)
        else:
            texts = [prompt] if isinstance(prompt, str) else [p for p in prompt or []
                                                                 if isinstance(p, str)]
            prompt_tokens = sum(count_tokens(t) for t in texts)
            n *= max(1, len(texts))
    else:
        max_out = (body.get("max_completion_tokens") or body.get("max_tokens")
                   or body.get("max_output_tokens"))
        fields = [body.get(k) for k in ("messages", "input", "instructions", "tools")]
        strings: list[str] = []
        _collect(fields, strings)
        messages = body.get("messages") or body.get("input")
        overhead = 4 * len(messages) if isinstance(messages, list) else 4
        prompt_tokens = count_tokens("\n".join(strings)) + overhead if strings else overhead
    if not isinstance(max_out, int) or max_out < 0:
        max_out = DEFAULT_OUTPUT_ESTIMATE
    return prompt_tokens + max_out * n


def _collect(obj: Any, out: list[str]) -> None:
    if isinstance(obj, str):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _collect(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _collect(v, out)


class _Bucket:
    def __init__(self, capacity: int, now: float) -> None:
        self.capacity, self.rate = capacity, capacity / 60.0
        self.level, self.t = float(capacity), now

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.t) * self.rate)
        self.t = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` is available (inf if it never fits)."""
        if amount > self.capacity:
            return math.inf
        return max(0.0, (amount - self.level) / self.rate) if self.rate else math.inf

    def reset_in(self) -> float:
        return max(0.0, (self.capacity - self.level) / self.rate) if self.rate else 0.0


@dataclass
class _KeyState:
    requests: _Bucket | None
    tokens: _Bucket | None
    in_flight: int = 0


@dataclass
class Decision:
    """The outcome of an admission: allowed or not, and the x-ratelimit-* headers to send."""

    allowed: bool
    headers: dict[str, str] = field(default_factory=dict)
    kind: str | None = None  # "requests" or "tokens" when refused
    message: str = ""
    retry_after: float = 0.0
    charged_tokens: int = 0


def format_reset(seconds: float) -> str:
    """OpenAI's style: "20ms", "1.5s", "6m0s"."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    minutes, secs = divmod(seconds, 60)
    if minutes:
        return f"{int(minutes)}m{int(secs)}s"
    return f"{secs:.2f}".rstrip("0").rstrip(".") + "s"


class RateLimiter:
    """Per-key limits. `admit` and `release` are synchronous and take a lock: exact under
    concurrency whether called from the event loop or from threads."""

    def __init__(self, tiers: dict[str, Tier], clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.tiers, self.clock = tiers, clock
        self._keys: dict[str, _KeyState] = {}
        self._lock = threading.Lock()

    def tier(self, name: str) -> Tier | None:
        return self.tiers.get(name)

    def _state(self, key_id: str, tier: Tier, now: float) -> _KeyState:
        st = self._keys.get(key_id)
        if st is None:
            st = self._keys[key_id] = _KeyState(
                _Bucket(tier.requests_per_minute, now) if tier.requests_per_minute is not None
                else None,
                _Bucket(tier.tokens_per_minute, now) if tier.tokens_per_minute is not None
                else None)
        return st

    def admit(self, key_id: str, tier_name: str, tokens: int) -> Decision:
        tier = self.tiers.get(tier_name)
        if tier is None:
            return Decision(True)
        with self._lock:
            now = self.clock()
            st = self._state(key_id, tier, now)
            for b in (st.requests, st.tokens):
                if b is not None:
                    b.refill(now)
            refusal: tuple[str, str, float] | None = None
            if st.requests is not None and st.requests.level < 1:
                refusal = ("requests", f"Rate limit reached for requests per minute (RPM) on "
                           f"tier {tier.name}: Limit {tier.requests_per_minute}, Used "
                           f"{tier.requests_per_minute}, Requested 1.", st.requests.wait_for(1))
            elif st.tokens is not None and st.tokens.level < tokens:
                used = st.tokens.capacity - max(0, int(st.tokens.level))
                refusal = ("tokens", f"Rate limit reached for tokens per minute (TPM) on tier "
                           f"{tier.name}: Limit {tier.tokens_per_minute}, Used {used}, Requested "
                           f"{tokens} (prompt estimate + max output tokens).",
                           st.tokens.wait_for(tokens))
            elif (tier.max_concurrent_requests is not None
                  and st.in_flight >= tier.max_concurrent_requests):
                refusal = ("requests", f"Too many concurrent requests on tier {tier.name}: Limit "
                           f"{tier.max_concurrent_requests}, In flight {st.in_flight}.", 1.0)
            if refusal is None:
                if st.requests is not None:
                    st.requests.level -= 1
                if st.tokens is not None:
                    st.tokens.level -= tokens
                st.in_flight += 1
            headers = self._headers(st, tier)
        if refusal is None:
            return Decision(True, headers, charged_tokens=tokens if st.tokens else 0)
        kind, message, wait = refusal
        wait = 60.0 if math.isinf(wait) else wait
        headers["retry-after"] = str(max(1, math.ceil(wait)))
        return Decision(False, headers, kind, message, wait)

    def release(self, key_id: str, tier_name: str, charged: int, actual: int | None) -> None:
        """A request finished: frees its concurrency slot and reconciles its token charge
        (actual None: usage unknown, the charge stands)."""
        tier = self.tiers.get(tier_name)
        if tier is None:
            return
        with self._lock:
            st = self._keys[key_id]
            st.in_flight -= 1
            if st.tokens is not None and actual is not None:
                st.tokens.refill(self.clock())
                st.tokens.level = min(st.tokens.capacity, st.tokens.level + charged - actual)

    @staticmethod
    def _headers(st: _KeyState, tier: Tier) -> dict[str, str]:
        h = {}
        if st.requests is not None:
            h["x-ratelimit-limit-requests"] = str(tier.requests_per_minute)
            h["x-ratelimit-remaining-requests"] = str(max(0, int(st.requests.level)))
            h["x-ratelimit-reset-requests"] = format_reset(st.requests.reset_in())
        if st.tokens is not None:
            h["x-ratelimit-limit-tokens"] = str(tier.tokens_per_minute)
            h["x-ratelimit-remaining-tokens"] = str(max(0, int(st.tokens.level)))
            h["x-ratelimit-reset-tokens"] = format_reset(st.tokens.reset_in())
        return h
