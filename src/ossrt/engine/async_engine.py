"""`AsyncEngine`: the asyncio front of `LLMEngine`, for the server.

The model loop runs in its own thread, so the event loop never blocks on a forward pass.
Requests and aborts reach that thread through a command queue and are applied between steps;
outputs come back through `loop.call_soon_threadsafe`. Leaving the `generate` iterator early
(a client that went away) aborts the request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from .llm_engine import LLMEngine, StepOutput
from .sampler import TokenMaskProvider
from .sequence import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The model loop failed; no further requests can be served."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.Queue[tuple[str, tuple[Any, ...]]] = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ossrt-engine", daemon=True)
        self._thread.start()

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str | None = None,
                       mask_provider: Callable[[], TokenMaskProvider] | None = None,
                       ) -> AsyncIterator[StepOutput]:
        """Yields each sequence's outputs as they come; raises the engine's validation errors
        (ContextLengthExceeded, QueueFull, ValueError) before the first output."""
        if self._error is not None:
            raise EngineDeadError("the engine loop has failed") from self._error
        rid = request_id or f"req-{next(self._ids)}"
        loop = asyncio.get_running_loop()
        added: asyncio.Future[None] = loop.create_future()
        out: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = (loop, out)
        self._commands.put(("add", (rid, prompt_token_ids, params, mask_provider, loop, added)))
        finished = 0
        try:
            await added
            while finished < params.n:
                item = await out.get()
                if isinstance(item, BaseException):
                    raise EngineDeadError("the engine loop has failed") from item
                finished += item.finished
                yield item
        finally:
            self._streams.pop(rid, None)
            if finished < params.n:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", (request_id,)))

    def add_adapter(self, name: str, weights: Any) -> None:
        """`LLMEngine.add_adapter` (a LoraWeights), from any thread."""
        self.engine.add_adapter(name, weights)

    def close(self) -> None:
        self._stop.set()
        self._commands.put(("wake", ()))
        self._thread.join(timeout=10)

    # ---- the engine thread -----------------------------------------------------------------
    def _apply(self, cmd: str, args: tuple[Any, ...]) -> None:
        if cmd == "add":
            rid, prompt, params, mask_provider, loop, fut = args
            try:
                self.engine.add_request(rid, prompt, params, mask_provider)
            except Exception as exc:  # validation errors go back to the caller
                loop.call_soon_threadsafe(_set_exception, fut, exc)
            else:
                loop.call_soon_threadsafe(_set_result, fut)
        elif cmd == "abort":
            self.engine.abort(args[0])

    def _loop(self) -> None:
        while not self._stop.is_set():
            block = not self.engine.has_unfinished()
            try:
                cmd, args = self._commands.get(block=block)
                self._apply(cmd, args)
                while True:  # apply everything queued before the next step
                    cmd, args = self._commands.get_nowait()
                    self._apply(cmd, args)
            except queue.Empty:
                pass
            if not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:
                log.exception("engine step failed")
                self._error = exc
                for loop, q in list(self._streams.values()):
                    loop.call_soon_threadsafe(q.put_nowait, exc)
                return
            for o in outputs:
                stream = self._streams.get(o.request_id)
                if stream is not None:
                    stream[0].call_soon_threadsafe(stream[1].put_nowait, o)


def _set_result(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
