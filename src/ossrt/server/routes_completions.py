"""POST /v1/completions: the legacy raw-prompt API (no Harmony), streamed or not."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..engine.sequence import ContextLengthExceeded, QueueFull, SampledToken, SamplingParams
from ..harmony.detok import IncrementalDecoder, StopMatcher
from .metrics import record_usage
from .errors import APIError, invalid
from .state import ServerState

router = APIRouter()
MAX_CHOICES = 128  # sequences one request may start (n x prompts), as OpenAI's n <= 128


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    user: str | None = None
    suffix: str | None = None
    best_of: int | None = None


def logit_bias_of(bias: dict[str, float] | None, vocab: int) -> tuple[tuple[int, float], ...]:
    out = []
    for key, value in (bias or {}).items():
        if not key.lstrip("-").isdigit() or not 0 <= int(key) < vocab:
            raise invalid(f"Invalid key in 'logit_bias': {key!r} is not a token id", "logit_bias")
        if not -100 <= value <= 100:
            raise invalid("'logit_bias' values must be between -100 and 100", "logit_bias")
        out.append((int(key), float(value)))
    return tuple(out)


def stops_of(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4:
        raise invalid("'stop' takes at most 4 sequences", "stop")
    return stops


@dataclass
class ChoiceState:
    """One choice's text as it streams: detokenized, cut at stop strings."""

    index: int
    decoder: IncrementalDecoder
    stops: StopMatcher
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[SampledToken] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class Delta:
    index: int
    text: str
    logprobs: list[SampledToken]
    finish_reason: str | None


async def run_prompt(state: ServerState, prompt_ids: list[int], params: SamplingParams,
                     stops: list[str], first_index: int, usage: dict[str, int]
                     ) -> AsyncIterator[Delta]:
    """One prompt's n choices as text deltas; `usage` is filled in as it goes."""
    rid = f"cmpl-{uuid.uuid4().hex}"
    choices = {i: ChoiceState(first_index + i, IncrementalDecoder(state.tokenizer),
                              StopMatcher(stops)) for i in range(params.n)}
    usage["prompt_tokens"] += len(prompt_ids)
    stream = state.engine.generate(prompt_ids, params, request_id=rid)
    try:
        async for out in stream:
            c = choices[out.index]
            if c.finish_reason is not None:
                continue  # already cut by a stop string
            usage["completion_tokens"] += len(out.token_ids)
            usage["cached_tokens"] = max(usage["cached_tokens"], out.num_cached_tokens)
            text = "".join(c.decoder.push(t) for t in out.token_ids)
            if out.finished:
                text += c.decoder.flush()
            emit, stopped = c.stops.feed(text)
            if out.finished and not stopped:
                emit += c.stops.flush()
            c.text += emit
            finish = "stop" if stopped else (
                ("length" if out.finish_reason == "length" else "stop") if out.finished else None)
            c.finish_reason = finish
            if emit or finish or out.logprobs:
                yield Delta(c.index, emit, out.logprobs, finish)
            if all(ch.finish_reason for ch in choices.values()):
                break
    finally:
        await stream.aclose()  # aborts the engine request if it is still running
        record_usage(usage["prompt_tokens"], usage["completion_tokens"], usage["cached_tokens"])


def logprobs_obj(state: ServerState, lps: list[SampledToken], offset: int) -> dict[str, Any]:
    dec = state.tokenizer.decode
    tokens, offsets = [], []
    for lp in lps:
        offsets.append(offset)
        tokens.append(dec([lp.token]))
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{dec([t]): v for t, v in lp.top_logprobs} for lp in lps],
            "text_offset": offsets}


async def merged(gens: list[AsyncIterator[Delta]]) -> AsyncIterator[Delta]:
    """Deltas of several prompts, in the order they arrive."""
    if len(gens) == 1:
        async for d in gens[0]:
            yield d
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(g: AsyncIterator[Delta]) -> None:
        try:
            async for d in g:
                await queue.put(d)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer below
            await queue.put(exc)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(g)) for g in gens]
    done = 0
    try:
        while done < len(tasks):
            item = await queue.get()
            if item is None:
                done += 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()


def engine_errors(exc: Exception) -> APIError:
    if isinstance(exc, ContextLengthExceeded):
        return invalid(str(exc), "messages", code="context_length_exceeded")
    if isinstance(exc, QueueFull):
        return APIError(503, "The server is overloaded; retry later.", type="server_error",
                        code="server_overloaded")
    return invalid(str(exc))


async def closing(events: AsyncIterator[str], *below: Any) -> AsyncIterator[str]:
    """Streams `events`; when it ends or the client goes away, closes the generators below at
    once, which aborts their engine requests and frees their KV blocks. An `APIError` raised
    once the stream has begun (a request timeout) ends it with an in-band `{"error": ...}`
    event, which the openai client raises as an APIError."""
    try:
        async for event in events:
            yield event
    except APIError as exc:
        yield sse(exc.body())
    finally:
        for gen in below:
            await gen.aclose()


async def prepend(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """`first` (unless None: the stream was empty), then the rest of the stream."""
    if first is not None:
        yield first
    async for item in rest:
        yield item


def sse(obj: dict[str, Any] | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Any:
    state: ServerState = request.app.state.ossrt
    card = state.model(body.model)
    if body.suffix:
        raise invalid("'suffix' is not supported by gpt-oss", "suffix")
    if body.best_of not in (None, body.n):
        raise invalid("'best_of' must equal 'n' (or be omitted)", "best_of")
    tok = state.tokenizer
    p = body.prompt
    if isinstance(p, str):
        prompts = [tok.encode(p, allow_special=False)]
    elif p and all(isinstance(x, str) for x in p):
        prompts = [tok.encode(x, allow_special=False) for x in p]  # type: ignore[arg-type]
    elif p and all(isinstance(x, int) for x in p):
        prompts = [list(p)]  # type: ignore[arg-type]
    else:
        prompts = [list(x) for x in p]  # type: ignore[union-attr]
    if not prompts or any(not x for x in prompts):
        raise invalid("'prompt' must not be empty", "prompt")
    if len(prompts) * body.n > MAX_CHOICES:
        raise invalid(f"'n' times the number of prompts must be at most {MAX_CHOICES} "
                      f"(got {body.n} x {len(prompts)})", "n")
    params = SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        logit_bias=logit_bias_of(body.logit_bias, card.vocab_size), seed=body.seed,
        max_tokens=body.max_tokens, n=body.n, logprobs=body.logprobs,
        stop_token_ids=tok.stop_token_ids, adapter=card.adapter)
    stops = stops_of(body.stop)
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}
    gens = [run_prompt(state, ids, params, stops, k * body.n, usage)
            for k, ids in enumerate(prompts)]
    created, cid = int(time.time()), f"cmpl-{uuid.uuid4().hex[:24]}"
    echo = {k * body.n + i: tok.decode(ids) for k, ids in enumerate(prompts)
            for i in range(body.n)} if body.echo else {}

    def usage_obj() -> dict[str, Any]:
        return {"prompt_tokens": usage["prompt_tokens"],
                "completion_tokens": usage["completion_tokens"],
                "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"],
                "prompt_tokens_details": {"cached_tokens": usage["cached_tokens"]}}

    base = {"id": cid, "object": "text_completion", "created": created, "model": card.id}
    if not body.stream:
        texts: dict[int, str] = {i: echo.get(i, "") for i in range(len(prompts) * body.n)}
        lps: dict[int, list[SampledToken]] = {i: [] for i in texts}
        finish: dict[int, str | None] = {i: None for i in texts}
        try:
            async for d in merged(gens):
                texts[d.index] += d.text
                lps[d.index] += d.logprobs
                finish[d.index] = d.finish_reason or finish[d.index]
        except (ContextLengthExceeded, QueueFull, ValueError) as exc:
            raise engine_errors(exc) from exc
        choices = [{"text": texts[i], "index": i, "finish_reason": finish[i] or "length",
                    "logprobs": logprobs_obj(state, lps[i], len(echo.get(i, "")))
                    if body.logprobs is not None else None} for i in texts]
        return {**base, "choices": choices, "usage": usage_obj()}

    first = merged(gens)
    try:  # validation errors must become a 400, not a broken stream
        head = await anext(first)
    except StopAsyncIteration:
        head = None
    except (ContextLengthExceeded, QueueFull, ValueError) as exc:
        raise engine_errors(exc) from exc

    async def events() -> AsyncIterator[str]:
        offsets = {i: len(echo.get(i, "")) for i in range(len(prompts) * body.n)}
        for i, text in echo.items():
            yield sse({**base, "choices": [{"text": text, "index": i, "logprobs": None,
                                            "finish_reason": None}]})
        async for d in prepend(head, first):
            lp = None
            if body.logprobs is not None:
                lp = logprobs_obj(state, d.logprobs, offsets[d.index])
            offsets[d.index] += len(d.text)
            yield sse({**base, "choices": [{"text": d.text, "index": d.index, "logprobs": lp,
                                            "finish_reason": d.finish_reason}]})
        if body.stream_options and body.stream_options.include_usage:
            yield sse({**base, "choices": [], "usage": usage_obj()})
        yield sse("[DONE]")

    return StreamingResponse(closing(events(), first), media_type="text/event-stream")
