"""POST /v1/responses (OpenAI Responses API) plus retrieve / delete / input_items.

Input items -> the neutral conversation (`ossrt.harmony`) -> Harmony prompt -> engine; the
parser's events drive one `OutputBuilder`, which makes both the streamed events and the final
output items (so a streamed response ends equal to a non-streamed one). Finished responses are
kept in the `ResponseStore` (SQLite in the data dir) unless `store: false`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from datetime import date
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..engine.sequence import ContextLengthExceeded, QueueFull, SamplingParams
from ..harmony import (AssistantMessage, FunctionTool, InstructionsMessage, MessageDone,
                       PreambleDelta, ReasoningDelta, TextDelta, ToolCall, ToolCallArgsDelta,
                       ToolCallStart, ToolResult, UserMessage, render_prompt)
from .errors import APIError, invalid, not_found
from .routes_chat import _text_of, run_chat
from .routes_completions import engine_errors, prepend
from .state import ServerState
from .store import ResponseStore
from .structured import FunctionSpec, compile_constraint, responses_answer_format, turn_spec

router = APIRouter()
logger = logging.getLogger(__name__)

STOP_TOKEN_IDS = (200002, 200012)  # <|return|>, <|call|>: never <|end|>


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    input: str | list[Any]
    instructions: str | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    reasoning: dict[str, Any] | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    text: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    store: bool = True
    previous_response_id: str | None = None
    stream: bool = False
    user: str | None = None


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# -- request -> items -> conversation ---------------------------------------------------------

def normalize_input(raw: str | list[Any]) -> list[dict[str, Any]]:
    """The request's input as Responses API items with ids; refuses what gpt-oss cannot take,
    naming the offending param (`input[2].call_id`)."""
    if isinstance(raw, str):
        return [{"type": "message", "id": _new_id("msg"), "role": "user", "status": "completed",
                 "content": [{"type": "input_text", "text": raw}]}]
    out = []
    for i, item in enumerate(raw):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise invalid("an input item must be an object", where)
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise invalid(f"unsupported role {role!r}", f"{where}.role")
            text = _text_of(item.get("content"), where)
            part: dict[str, Any] = {"type": "input_text", "text": text}
            if role == "assistant":
                part = {"type": "output_text", "text": text, "annotations": []}
            out.append({"type": "message", "id": item.get("id") or _new_id("msg"), "role": role,
                        "status": "completed", "content": [part]})
        elif kind == "reasoning":
            for key in ("content", "summary"):
                if not isinstance(item.get(key) or [], list):
                    raise invalid(f"a reasoning item's '{key}' must be a list", f"{where}.{key}")
            content = [{"type": "reasoning_text", "text": str(p.get("text", ""))}
                       for p in item.get("content") or [] if isinstance(p, dict)]
            summary = [{"type": "summary_text", "text": str(p.get("text", ""))}
                       for p in item.get("summary") or [] if isinstance(p, dict)]
            out.append({"type": "reasoning", "id": item.get("id") or _new_id("rs"),
                        "summary": summary, "content": content})
        elif kind == "function_call":
            for key in ("call_id", "name"):
                if not isinstance(item.get(key), str) or not item[key]:
                    raise invalid(f"a function_call item needs '{key}'", f"{where}.{key}")
            args = item.get("arguments", "{}")
            if not isinstance(args, str):
                args = json.dumps(args)
            out.append({"type": "function_call", "id": item.get("id") or _new_id("fc"),
                        "call_id": item["call_id"], "name": item["name"], "arguments": args,
                        "status": "completed"})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str) or not item["call_id"]:
                raise invalid("a function_call_output item needs 'call_id'", f"{where}.call_id")
            output = item.get("output")
            if output is None:
                raise invalid("a function_call_output item needs 'output'", f"{where}.output")
            if not isinstance(output, str):
                output = _text_of(output, where) if isinstance(output, list) else json.dumps(
                    output)
            out.append({"type": "function_call_output", "id": item.get("id") or _new_id("fco"),
                        "call_id": item["call_id"], "output": output, "status": "completed"})
        else:
            raise invalid(f"unsupported input item type {kind!r} (gpt-oss takes message, "
                          "reasoning, function_call and function_call_output items)",
                          f"{where}.type", code="unsupported_input_item")
    return out


def _item_text(item: dict[str, Any], part_type: str) -> str:
    return "".join(p.get("text", "") for p in item.get("content") or []
                   if p.get("type") == part_type)


def items_to_conversation(items: list[dict[str, Any]]) -> list[Any]:
    """Normalized items -> conversation messages. Reasoning attaches to the next assistant
    turn; an assistant message and the function calls after it form one turn."""
    out: list[Any] = []
    reasoning: list[str] = []
    text: str | None = None
    calls: list[ToolCall] = []

    def flush() -> None:
        nonlocal text, calls
        if reasoning or text is not None or calls:
            out.append(AssistantMessage(text=text, reasoning="\n".join(reasoning) or None,
                                        tool_calls=tuple(calls)))
        reasoning.clear()
        text, calls = None, []

    for item in items:
        kind = item["type"]
        if kind == "reasoning":
            if text is not None or calls:
                flush()
            chunk = _item_text(item, "reasoning_text") or "".join(
                p.get("text", "") for p in item.get("summary") or [])
            if chunk:
                reasoning.append(chunk)
        elif kind == "function_call":
            calls.append(ToolCall(call_id=item["call_id"], name=item["name"],
                                  arguments=item["arguments"]))
        elif kind == "message" and item["role"] == "assistant":
            if text is not None or calls:
                flush()
            text = _item_text(item, "output_text")
        else:
            flush()
            if kind == "function_call_output":
                out.append(ToolResult(call_id=item["call_id"], output=item["output"]))
            elif item["role"] == "user":
                out.append(UserMessage(_item_text(item, "input_text")))
            else:
                out.append(InstructionsMessage(_item_text(item, "input_text"), role=item["role"]))
    flush()
    return out


def _tools_of(raw: list[Any] | None) -> tuple[list[dict[str, Any]], list[FunctionTool]]:
    echo, tools = [], []
    for i, t in enumerate(raw or []):
        if not isinstance(t, dict) or t.get("type") != "function":
            kind = t.get("type") if isinstance(t, dict) else None
            raise invalid(f"tool type {kind!r} is not supported: gpt-oss takes function tools",
                          f"tools[{i}].type", code="unsupported_tool")
        name = t.get("name")
        if not isinstance(name, str) or not name or len(name) > 64 or not all(
                c.isalnum() or c in "_-" for c in name):
            raise invalid("a function tool needs a 'name' of letters, digits, '_' and '-'",
                          f"tools[{i}].name")
        params = t.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise invalid("'parameters' must be a JSON Schema object", f"tools[{i}].parameters")
        strict = t.get("strict")
        echo.append({"type": "function", "name": name, "description": t.get("description"),
                     "parameters": params, "strict": True if strict is None else bool(strict)})
        tools.append(FunctionTool(name, t.get("description") or "", params))
    return echo, tools


# -- output building ---------------------------------------------------------------------------

class OutputBuilder:
    """Parser events -> Responses stream events (without sequence numbers) + output items."""

    def __init__(self) -> None:
        self.output: list[dict[str, Any]] = []
        self._cur: dict[str, Any] | None = None
        self._kind: str | None = None  # reasoning | message | function_call | skip
        self._chunks: list[str] = []
        self.status = "completed"  # what closing items get; "incomplete" for a cut turn

    def feed(self, ev: Any) -> list[dict[str, Any]]:
        if isinstance(ev, ReasoningDelta):
            return self._delta("reasoning", ev.text)
        if isinstance(ev, (TextDelta, PreambleDelta)):
            return self._delta("message", ev.text)
        if isinstance(ev, ToolCallStart):
            out = self.close()
            if not ev.name.startswith("functions."):  # built-in tools are not served yet
                self._kind = "skip"
                return out
            return out + self._open("function_call", call_id=ev.call_id,
                                    name=ev.name.removeprefix("functions."))
        if isinstance(ev, ToolCallArgsDelta):
            if self._kind != "function_call" or not ev.text:
                return []
            self._chunks.append(ev.text)
            return [self._ev("response.function_call_arguments.delta", delta=ev.text)]
        if isinstance(ev, MessageDone):
            return self.close()
        return []

    def _ev(self, type_: str, **fields: Any) -> dict[str, Any]:
        assert self._cur is not None
        return {"type": type_, "item_id": self._cur["id"], "output_index": len(self.output),
                **fields}

    def _delta(self, kind: str, text: str) -> list[dict[str, Any]]:
        out = [] if self._kind == kind else self.close() + self._open(kind)
        if not text:
            return out
        self._chunks.append(text)
        name = "response.reasoning_text.delta" if kind == "reasoning" else (
            "response.output_text.delta")
        extra = {} if kind == "reasoning" else {"logprobs": []}
        return out + [self._ev(name, content_index=0, delta=text, **extra)]

    def _open(self, kind: str, **fields: Any) -> list[dict[str, Any]]:
        self._kind, self._chunks = kind, []
        if kind == "reasoning":
            self._cur = {"id": _new_id("rs"), "type": "reasoning", "summary": [], "content": []}
            part = {"type": "reasoning_text", "text": ""}
        elif kind == "message":
            self._cur = {"id": _new_id("msg"), "type": "message", "role": "assistant",
                         "status": "in_progress", "content": []}
            part = {"type": "output_text", "text": "", "annotations": []}
        else:
            self._cur = {"id": _new_id("fc"), "type": "function_call", "status": "in_progress",
                         "arguments": "", **fields}
            return [{"type": "response.output_item.added", "output_index": len(self.output),
                     "item": dict(self._cur)}]
        return [{"type": "response.output_item.added", "output_index": len(self.output),
                 "item": dict(self._cur)},
                self._ev("response.content_part.added", content_index=0, part=part)]

    def close(self) -> list[dict[str, Any]]:
        """Ends the open item (if any): its done events; the item joins `output`."""
        kind, item = self._kind, self._cur
        self._kind, self._cur = None, None
        if item is None or kind is None:
            return []
        self._cur = item  # for _ev
        text = "".join(self._chunks)
        if kind == "reasoning":
            part = {"type": "reasoning_text", "text": text}
            item["content"] = [part]
            out = [self._ev("response.reasoning_text.done", content_index=0, text=text),
                   self._ev("response.content_part.done", content_index=0, part=part)]
        elif kind == "message":
            part = {"type": "output_text", "text": text, "annotations": []}
            item["content"], item["status"] = [part], self.status
            out = [self._ev("response.output_text.done", content_index=0, text=text,
                            logprobs=[]),
                   self._ev("response.content_part.done", content_index=0, part=part)]
        else:
            item["arguments"], item["status"] = text, self.status
            out = [self._ev("response.function_call_arguments.done", arguments=text)]
        out.append({"type": "response.output_item.done", "output_index": len(self.output),
                    "item": item})
        self._cur = None
        self.output.append(item)
        return out


def sse_event(seq: int, ev: dict[str, Any]) -> str:
    return f"event: {ev['type']}\ndata: {json.dumps({**ev, 'sequence_number': seq})}\n\n"


# -- routes ----------------------------------------------------------------------------------

def _store(state: ServerState) -> ResponseStore:
    store = getattr(state, "store", None)
    if store is None:  # an app built without a data dir: keep responses in memory
        store = state.store = ResponseStore(None)
    return store


@router.post("/v1/responses")
async def create_response(body: ResponsesRequest, request: Request) -> Any:
    state: ServerState = request.app.state.ossrt
    card = state.model(body.model)
    store = _store(state)
    if body.text is not None and not isinstance(body.text, dict):
        raise invalid("text must be an object", "text")
    fmt = (body.text or {}).get("format") or {"type": "text"}
    answer = responses_answer_format(fmt)
    effort = (body.reasoning or {}).get("effort") or "medium"
    if effort == "minimal":
        effort = "low"
    if effort not in ("low", "medium", "high"):
        raise invalid("reasoning.effort must be 'low', 'medium' or 'high'", "reasoning.effort")
    tools_echo, tools = _tools_of(body.tools)
    choice = body.tool_choice
    if isinstance(choice, dict):
        if choice.get("type") != "function" or choice.get("name") not in {t.name for t in tools}:
            raise invalid(f"tool_choice names an unknown function {choice.get('name')!r}",
                          "tool_choice")
    elif choice not in (None, "auto", "none", "required"):
        raise invalid("tool_choice must be 'auto', 'none', 'required' or a function",
                      "tool_choice")
    input_items = normalize_input(body.input)
    history: list[dict[str, Any]] = []
    if body.previous_response_id:
        chain = await asyncio.to_thread(store.chain, body.previous_response_id)
        if chain is None:
            raise not_found(f"Previous response with id '{body.previous_response_id}' not found.",
                            "previous_response_id", code="previous_response_not_found")
        history = chain
    convo = items_to_conversation(history + input_items)
    try:
        prompt = render_prompt(convo, reasoning_effort=effort,
                               tools=[] if choice == "none" else tools,
                               instructions=body.instructions,
                               current_date=date.today().isoformat(),
                               response_format=answer.prompt_section())
    except ValueError as exc:
        raise invalid(str(exc), "input") from exc
    params = SamplingParams(temperature=1.0 if body.temperature is None else body.temperature,
                            top_p=1.0 if body.top_p is None else body.top_p,
                            max_tokens=body.max_output_tokens, stop_token_ids=STOP_TOKEN_IDS)
    functions = [FunctionSpec(t["name"], t["parameters"], bool(t["strict"]),
                              f"tools[{i}].parameters") for i, t in enumerate(tools_echo)]
    forced = choice.get("name") if isinstance(choice, dict) else choice
    constraint = await compile_constraint(
        turn_spec(answer, functions, forced, params.max_tokens), answer, functions)
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0,
             "reasoning_tokens": 0}
    rid, created = _new_id("resp"), int(time.time())
    response: dict[str, Any] = {
        "id": rid, "object": "response", "created_at": created, "status": "in_progress",
        "error": None, "incomplete_details": None, "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens, "model": card.id, "output": [],
        "parallel_tool_calls": True if body.parallel_tool_calls is None
        else body.parallel_tool_calls,
        "previous_response_id": body.previous_response_id,
        "reasoning": {"effort": effort, "summary": None}, "store": body.store,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "text": {"format": fmt}, "tool_choice": choice or "auto",
        "tools": tools_echo, "top_p": 1.0 if body.top_p is None else body.top_p,
        "truncation": "disabled", "usage": None, "user": body.user,
        "metadata": body.metadata or {}}
    gen = run_chat(state, prompt, params, [], usage, constraint.factory if constraint else None)
    try:
        first = await anext(gen)
    except StopAsyncIteration:
        first = None
    except (ContextLengthExceeded, QueueFull, ValueError) as exc:
        err = engine_errors(exc)
        if err.code == "context_length_exceeded":
            err.param = "input"
        raise err from exc
    builder = OutputBuilder()

    async def produce() -> AsyncIterator[dict[str, Any]]:
        finish = None
        async for run, evs in prepend(first, gen):
            if run.finish == "length":
                builder.status = "incomplete"
            for ev in evs:
                for out in builder.feed(ev):
                    yield out
            finish = run.finish or finish
        if finish is None:
            builder.status = "incomplete"
        for out in builder.close():
            yield out
        response["output"] = builder.output
        if finish in (None, "length"):
            response["status"] = "incomplete"
            response["incomplete_details"] = {"reason": "max_output_tokens"}
        else:
            response["status"] = "completed"
        response["usage"] = {
            "input_tokens": usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": usage["cached_tokens"]},
            "output_tokens": usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": usage["reasoning_tokens"]},
            "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}
        if body.store:
            await asyncio.to_thread(store.put, response, input_items)

    if not body.stream:
        try:
            async for _ in produce():
                pass
        except (ContextLengthExceeded, QueueFull, ValueError) as exc:
            raise engine_errors(exc) from exc
        return response

    async def events() -> AsyncIterator[str]:
        seq = 0

        def emit(ev: dict[str, Any]) -> str:
            nonlocal seq
            seq += 1
            return sse_event(seq - 1, ev)

        yield emit({"type": "response.created", "response": dict(response)})
        yield emit({"type": "response.in_progress", "response": dict(response)})
        try:
            async for ev in produce():
                yield emit(ev)
        except Exception as exc:  # noqa: BLE001 - the stream has begun: report it in-band
            if isinstance(exc, APIError):  # e.g. the request timeout: expected, no traceback
                logger.warning("response %s failed: %s", rid, exc.message)
            else:
                logger.exception("response %s failed", rid)
            msg = exc.message if isinstance(exc, APIError) else str(exc) or type(exc).__name__
            code = (exc.code or exc.type) if isinstance(exc, APIError) else "server_error"
            response.update(status="failed", output=builder.output,
                            error={"code": code, "message": msg})
            yield emit({"type": "response.failed", "response": response})
            return
        final = "response.completed" if response["status"] == "completed" else (
            "response.incomplete")
        yield emit({"type": final, "response": response})

    return StreamingResponse(events(), media_type="text/event-stream")


@router.get("/v1/responses/{response_id}")
async def retrieve_response(response_id: str, request: Request) -> Any:
    stored = await asyncio.to_thread(_store(request.app.state.ossrt).get, response_id)
    if stored is None:
        raise _missing(response_id)
    return stored.response


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request) -> Any:
    if not await asyncio.to_thread(_store(request.app.state.ossrt).delete, response_id):
        raise _missing(response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}


@router.get("/v1/responses/{response_id}/input_items")
async def list_input_items(response_id: str, request: Request,
                           limit: int = Query(20, ge=1, le=100),
                           order: Literal["asc", "desc"] = "desc",
                           after: str | None = None) -> Any:
    stored = await asyncio.to_thread(_store(request.app.state.ossrt).get, response_id)
    if stored is None:
        raise _missing(response_id)
    items = list(stored.input_items)
    if order == "desc":
        items.reverse()
    if after is not None:
        ids = [it.get("id") for it in items]
        if after not in ids:
            raise invalid(f"no input item with id '{after}' in this response", "after")
        items = items[ids.index(after) + 1:]
    page = items[:limit]
    return {"object": "list", "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > limit}


def _missing(response_id: str) -> APIError:
    return not_found(f"Response with id '{response_id}' not found.", "response_id",
                     code="response_not_found")
