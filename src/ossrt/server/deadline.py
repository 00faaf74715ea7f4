"""Per-request time limits (`ossrt serve --request-timeout`).

`TimedEngine` wraps any `EngineClient`: each `generate` stream must finish within `timeout_s`
of the call (time waiting in the engine's queue counts). When the deadline passes, the stream
is closed, which aborts the engine request and frees its KV blocks, and `RequestTimeout` is
raised to the route: a 504 before any output, an in-band error once a stream has begun.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from ..engine.sequence import SamplingParams, StepOutput
from .errors import APIError
from .state import EngineClient


class RequestTimeout(APIError):
    def __init__(self, timeout_s: float) -> None:
        super().__init__(504, f"The request did not finish within this server's limit of "
                         f"{timeout_s:g} seconds (--request-timeout); generation was stopped. "
                         "Ask for fewer tokens (max_tokens / max_output_tokens) or retry.",
                         type="server_error", code="request_timeout")


class TimedEngine:
    def __init__(self, inner: EngineClient, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.inner, self.timeout_s = inner, timeout_s

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str | None = None,
                       mask_provider: Callable[[], Any] | None = None,
                       ) -> AsyncIterator[StepOutput]:
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        stream = self.inner.generate(prompt_token_ids, params, request_id=request_id,
                                     mask_provider=mask_provider)
        try:
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        out = await anext(stream)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise RequestTimeout(self.timeout_s) from None
                yield out
        finally:
            await stream.aclose()  # aborts the engine request if it is still running

    def abort(self, request_id: str) -> None:
        self.inner.abort(request_id)

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()
