"""POST /v1/chat/completions: API messages -> Harmony prompt -> engine -> parsed turn."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from datetime import date
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..engine.sequence import ContextLengthExceeded, QueueFull, SampledToken, SamplingParams
from ..harmony import (AssistantMessage, FunctionTool, HarmonyStreamParser, InstructionsMessage,
                       ReasoningDelta, TextDelta, ToolCall, ToolCallArgsDelta, ToolCallStart,
                       ToolResult, UserMessage, render_prompt)
from ..harmony.detok import StopMatcher
from .metrics import record_usage
from .errors import invalid
from .routes_completions import (StreamOptions, closing, engine_errors, logit_bias_of,
                                 prepend, sse, stops_of)
from .state import ServerState
from .structured import FunctionSpec, chat_answer_format, compile_constraint, turn_spec

router = APIRouter()


class FunctionDef(BaseModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDef


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=128)
    seed: int | None = None
    stop: str | list[str] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: dict[str, Any] | None = None
    user: str | None = None


def _text_of(content: Any, where: str) -> str:
    """A message's content: a string, or a list of text parts (anything else is refused)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("text", "input_text", "output_text"):
                if not isinstance(part.get("text", ""), str):
                    raise invalid("a text part's 'text' must be a string",
                                  f"{where}.content[{i}].text")
                out.append(part.get("text", ""))
            elif kind in ("image_url", "input_image", "input_audio", "file", "input_file"):
                raise invalid(f"gpt-oss is a text-only model: '{kind}' content is not supported",
                              f"{where}.content[{i}]", code="unsupported_content")
            else:
                raise invalid(f"unknown content part type {kind!r}", f"{where}.content[{i}]")
        return "".join(out)
    raise invalid("content must be a string or a list of content parts", f"{where}.content")


def to_conversation(messages: list[dict[str, Any]]) -> list[Any]:
    out: list[Any] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = m.get("role")
        if role in ("system", "developer"):
            out.append(InstructionsMessage(_text_of(m.get("content"), where), role=role))
        elif role == "user":
            out.append(UserMessage(_text_of(m.get("content"), where)))
        elif role == "assistant":
            calls = []
            raw_calls = m.get("tool_calls") or []
            if not isinstance(raw_calls, list):
                raise invalid("'tool_calls' must be a list", f"{where}.tool_calls")
            for j, tc in enumerate(raw_calls):
                fn = tc.get("function") if isinstance(tc, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn[
                        "name"]:
                    raise invalid("tool call without a function name",
                                  f"{where}.tool_calls[{j}].function.name")
                args = fn.get("arguments") or "{}"
                if not isinstance(args, str):
                    args = json.dumps(args)
                call_id = tc.get("id")
                calls.append(ToolCall(call_id=call_id if isinstance(call_id, str) and call_id
                                      else f"call_{j}", name=fn["name"], arguments=args))
            reasoning = m.get("reasoning_content") or m.get("reasoning") or None
            text = _text_of(m.get("content"), where) or None
            out.append(AssistantMessage(text=text, reasoning=reasoning, tool_calls=tuple(calls)))
        elif role == "tool":
            if not isinstance(m.get("tool_call_id"), str) or not m["tool_call_id"]:
                raise invalid("a tool message needs 'tool_call_id'", f"{where}.tool_call_id")
            out.append(ToolResult(call_id=m["tool_call_id"],
                                  output=_text_of(m.get("content"), where)))
        else:
            raise invalid(f"unsupported role {role!r}", f"{where}.role")
    return out


@dataclass
class ChoiceRun:
    """One choice as it streams: the Harmony parser plus final-text stop strings."""

    index: int
    parser: HarmonyStreamParser
    stops: StopMatcher
    content: str = ""
    reasoning: str = ""
    reasoning_tokens: int = 0
    logprobs: list[SampledToken] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # generated ids, the stop token included
    stopped: bool = False
    finish: str | None = None


def _chat_params(body: ChatRequest, card_vocab: int) -> SamplingParams:
    return SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        logit_bias=logit_bias_of(body.logit_bias, card_vocab), seed=body.seed,
        max_tokens=body.max_completion_tokens or body.max_tokens, n=body.n,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        stop_token_ids=(200002, 200012))  # <|return|>, <|call|>: never <|end|>


async def run_chat(state: ServerState, prompt: list[int], params: SamplingParams,
                   stops: list[str], usage: dict[str, int],
                   mask_provider: Callable[[], Any] | None = None,
                   ) -> AsyncIterator[tuple[ChoiceRun, list[Any]]]:
    """Yields (choice, its new events) as tokens arrive; parsers see every token.
    `mask_provider` makes each sequence's token-mask provider (structured outputs)."""
    runs = {i: ChoiceRun(i, HarmonyStreamParser(), StopMatcher(stops)) for i in range(params.n)}
    usage["prompt_tokens"] = len(prompt)
    stream = state.engine.generate(prompt, params, request_id=f"chat-{uuid.uuid4().hex}",
                                   mask_provider=mask_provider)
    try:
        async for out in stream:
            run = runs[out.index]
            usage["cached_tokens"] = out.num_cached_tokens
            events: list[Any] = []
            for tok in out.token_ids:
                usage["completion_tokens"] += 1
                if run.parser.current_channel == "analysis":
                    run.reasoning_tokens += 1
                    usage["reasoning_tokens"] += 1
                events += run.parser.feed(tok)
            run.logprobs += out.logprobs
            run.tokens += out.token_ids
            if out.stop_token_id is not None:  # <|return|> / <|call|>: the parser must see it
                run.tokens.append(out.stop_token_id)
                events += run.parser.feed(out.stop_token_id)
            if out.finished:
                events += run.parser.finish("length" if out.finish_reason == "length" else "stop")
                run.finish = _finish_of(run.parser, out.finish_reason)
            yield run, events
            if all(r.finish for r in runs.values()):
                break
    finally:
        await stream.aclose()
        record_usage(usage["prompt_tokens"], usage["completion_tokens"], usage["cached_tokens"], usage["reasoning_tokens"])  # noqa: E501


def _finish_of(parser: HarmonyStreamParser, engine_reason: str | None) -> str:
    if engine_reason == "length":
        return "length"
    return "tool_calls" if parser.tool_calls else "stop"


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request) -> Any:
    state: ServerState = request.app.state.ossrt
    card = state.model(body.model)
    answer = chat_answer_format(body.response_format)
    convo = to_conversation(body.messages)
    tools = [FunctionTool(t.function.name, t.function.description or "",
                          t.function.parameters) for t in body.tools or []]
    choice = body.tool_choice
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if name not in {t.name for t in tools}:
            raise invalid(f"tool_choice names an unknown function {name!r}", "tool_choice")
    elif choice not in (None, "auto", "none", "required"):
        raise invalid("tool_choice must be 'auto', 'none', 'required' or a function",
                      "tool_choice")
    if choice == "none":
        tools = []  # the model cannot call what it is not shown
    try:
        prompt = render_prompt(convo, reasoning_effort=body.reasoning_effort or "medium",
                               tools=tools, current_date=date.today().isoformat(),
                               response_format=answer.prompt_section())
    except ValueError as exc:
        raise invalid(str(exc), "messages") from exc
    params = replace(_chat_params(body, card.vocab_size), adapter=card.adapter)
    functions = [FunctionSpec(t.function.name, t.function.parameters, bool(t.function.strict),
                              f"tools[{i}].function.parameters")
                 for i, t in enumerate(body.tools or [])]
    forced = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else choice
    spec = turn_spec(answer, functions, forced, params.max_tokens)
    constraint = await compile_constraint(spec, answer, functions)
    stops = stops_of(body.stop)
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0,
             "reasoning_tokens": 0}
    created, cid = int(time.time()), f"chatcmpl-{uuid.uuid4().hex[:24]}"
    base = {"id": cid, "created": created, "model": card.id, "system_fingerprint": "ossrt"}
    gen = run_chat(state, prompt, params, stops, usage,
                   constraint.factory if constraint else None)

    def usage_obj() -> dict[str, Any]:
        return {"prompt_tokens": usage["prompt_tokens"],
                "completion_tokens": usage["completion_tokens"],
                "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"],
                "prompt_tokens_details": {"cached_tokens": usage["cached_tokens"]},
                "completion_tokens_details": {"reasoning_tokens": usage["reasoning_tokens"]}}

    def logprobs_obj(lps: list[SampledToken]) -> dict[str, Any] | None:
        if not body.logprobs:
            return None
        dec = state.tokenizer.decode

        def item(t: int, v: float | None) -> dict[str, Any]:
            s = dec([t])
            return {"token": s, "logprob": v, "bytes": list(s.encode())}
        return {"content": [{**item(lp.token, lp.logprob),
                             "top_logprobs": [item(t, v) for t, v in lp.top_logprobs]}
                            for lp in lps]}

    try:
        first = await anext(gen)
    except StopAsyncIteration:
        first = None
    except (ContextLengthExceeded, QueueFull, ValueError) as exc:
        raise engine_errors(exc) from exc

    if not body.stream:
        runs: dict[int, ChoiceRun] = {}
        async for run, _ in prepend(first, gen):
            runs[run.index] = run
        choices = []
        for i in range(body.n):
            run = runs[i]
            turn = run.parser.turn
            text, stopped = run.stops.feed(turn.text)
            text += "" if stopped else run.stops.flush()
            calls = [{"id": c.call_id, "type": "function",
                      "function": {"name": c.function_name, "arguments": c.arguments}}
                     for c in turn.tool_calls if c.namespace == "functions"]
            msg: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else ""),
                                   "reasoning_content": turn.reasoning or None,
                                   "reasoning": turn.reasoning or None}
            if calls:
                msg["tool_calls"] = calls
            finish = "stop" if stopped else run.finish or "length"
            choices.append({"index": i, "message": msg, "finish_reason": finish,
                            "logprobs": logprobs_obj(run.logprobs)})
        return {**base, "object": "chat.completion", "choices": choices, "usage": usage_obj()}

    async def events() -> AsyncIterator[str]:
        chunk = {**base, "object": "chat.completion.chunk"}

        def delta(i: int, d: dict[str, Any], finish: str | None = None,
                  lps: list[SampledToken] | None = None) -> str:
            c: dict[str, Any] = {"index": i, "delta": d, "finish_reason": finish,
                                 "logprobs": logprobs_obj(lps) if lps else None}
            return sse({**chunk, "choices": [c]})

        for i in range(body.n):
            yield delta(i, {"role": "assistant", "content": ""})
        tool_index: dict[tuple[int, int], int] = {}
        async for run, evs in prepend(first, gen):
            i = run.index
            for ev in evs:
                if run.stopped:
                    break
                if isinstance(ev, ReasoningDelta) and ev.text:
                    yield delta(i, {"reasoning_content": ev.text, "reasoning": ev.text})
                elif isinstance(ev, TextDelta):
                    text, run.stopped = run.stops.feed(ev.text)
                    if text:
                        yield delta(i, {"content": text})
                elif isinstance(ev, ToolCallStart) and ev.name.startswith("functions."):
                    k = tool_index.setdefault((i, ev.index), len(
                        [x for x in tool_index if x[0] == i]))
                    yield delta(i, {"tool_calls": [{
                        "index": k, "id": ev.call_id, "type": "function",
                        "function": {"name": ev.name.removeprefix("functions."),
                                     "arguments": ""}}]})
                elif isinstance(ev, ToolCallArgsDelta) and (i, ev.index) in tool_index:
                    yield delta(i, {"tool_calls": [{"index": tool_index[(i, ev.index)],
                                                    "function": {"arguments": ev.text}}]})
            if run.finish or run.stopped:
                if not run.stopped:
                    rest = run.stops.flush()
                    if rest:
                        yield delta(i, {"content": rest})
                finish = "stop" if run.stopped else run.finish
                yield delta(i, {}, finish)
                run.finish = run.finish or "stop"
        if body.stream_options and body.stream_options.include_usage:
            yield sse({**chunk, "choices": [], "usage": usage_obj()})
        yield sse("[DONE]")

    return StreamingResponse(closing(events(), gen), media_type="text/event-stream")
