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
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import date
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..engine.sequence import ContextLengthExceeded, QueueFull, SamplingParams
from ..harmony import (AssistantMessage, FunctionTool, InstructionsMessage, ToolCall, ToolResult,
                       UserMessage, render_prompt, render_tool_result)
from .agent import BuiltinTools, builtin_of
from .errors import APIError, invalid, not_found
from .metrics import record_tool_call
from .routes_chat import _text_of, run_chat
from .routes_completions import engine_errors, prepend
from .responses_output import OutputBuilder
from .responses_output import new_id as _new_id
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
    max_tool_calls: int | None = Field(None, ge=1)
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
        elif kind in ("web_search_call", "code_interpreter_call"):
            out.append({k: v for k, v in item.items() if k != "_harmony"}
                       | {"id": item.get("id") or _new_id("ws" if kind[0] == "w" else "ci")})
        else:
            raise invalid(f"unsupported input item type {kind!r} (gpt-oss takes message, "
                          "reasoning, function_call, function_call_output, web_search_call "
                          "and code_interpreter_call items)",
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
        elif kind in ("web_search_call", "code_interpreter_call"):
            seen = item.get("_harmony")  # what the model wrote and read (stored responses)
            if not seen or "output" not in seen:
                continue  # a call we cannot replay faithfully is left out
            namespace, _, name = seen["recipient"].rpartition(".")
            calls.append(ToolCall(call_id=item["id"], name=name, arguments=seen["arguments"],
                                  namespace=namespace or None, channel=seen["channel"]))
            flush()
            out.append(ToolResult(call_id=item["id"], output=seen["output"]))
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


class RequestTools:
    """The request's `tools`: function tools, and the built-in tools it switches on."""

    def __init__(self, raw: list[Any] | None, builtin: BuiltinTools | None) -> None:
        self.echo: list[dict[str, Any]] = []  # what the response object shows
        self.functions: list[FunctionTool] = []
        self.specs: list[FunctionSpec] = []  # for strict (constrained) arguments
        self.builtins: set[str] = set()
        for i, t in enumerate(raw or []):
            if not isinstance(t, dict):
                raise invalid("a tool must be an object", f"tools[{i}]")
            hosted = builtin_of(t, i, builtin)
            if hosted is not None:
                self.builtins.add(hosted)
                self.echo.append(t)
                continue
            if t.get("type") != "function":
                raise invalid(f"tool type {t.get('type')!r} is not supported: gpt-oss takes "
                              "function, web_search_preview and code_interpreter tools",
                              f"tools[{i}].type", code="unsupported_tool")
            name = t.get("name")
            if not isinstance(name, str) or not name or len(name) > 64 or not all(
                    c.isalnum() or c in "_-" for c in name):
                raise invalid("a function tool needs a 'name' of letters, digits, '_' and '-'",
                              f"tools[{i}].name")
            params = t.get("parameters")
            if params is not None and not isinstance(params, dict):
                raise invalid("'parameters' must be a JSON Schema object",
                              f"tools[{i}].parameters")
            strict = True if t.get("strict") is None else bool(t.get("strict"))
            self.echo.append({"type": "function", "name": name,
                              "description": t.get("description"), "parameters": params,
                              "strict": strict})
            self.functions.append(FunctionTool(name, t.get("description") or "", params))
            self.specs.append(FunctionSpec(name, params, strict, f"tools[{i}].parameters"))


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
    builtin: BuiltinTools | None = getattr(state, "builtin_tools", None)
    tools = RequestTools(body.tools, builtin)
    choice = body.tool_choice
    if isinstance(choice, dict):
        hosted = choice.get("type") in ("web_search_preview", "web_search", "code_interpreter")
        if not hosted and (choice.get("type") != "function" or choice.get("name") not in {
                t.name for t in tools.functions}):
            raise invalid(f"tool_choice names an unknown function {choice.get('name')!r}",
                          "tool_choice")
        if hosted:
            choice = "auto"  # the model is shown the tool; calling it stays its choice
    elif choice not in (None, "auto", "none", "required"):
        raise invalid("tool_choice must be 'auto', 'none', 'required' or a function",
                      "tool_choice")
    builtins = frozenset() if choice == "none" else frozenset(tools.builtins)
    input_items = normalize_input(body.input)
    history: list[dict[str, Any]] = []
    conversation: str | None = None  # tool state (browser pages, python files) is kept per chain
    if body.previous_response_id:
        chain = await asyncio.to_thread(store.chain, body.previous_response_id)
        if chain is None:
            raise not_found(f"Previous response with id '{body.previous_response_id}' not found.",
                            "previous_response_id", code="previous_response_not_found")
        history = chain
        conversation = await asyncio.to_thread(store.conversation_of, body.previous_response_id)
    convo = items_to_conversation(history + input_items)
    try:
        prompt = render_prompt(convo, reasoning_effort=effort,
                               tools=[] if choice == "none" else tools.functions,
                               instructions=body.instructions,
                               current_date=date.today().isoformat(),
                               builtin_tools=sorted(builtins),
                               response_format=answer.prompt_section())
    except ValueError as exc:
        raise invalid(str(exc), "input") from exc
    params = SamplingParams(temperature=1.0 if body.temperature is None else body.temperature,
                            top_p=1.0 if body.top_p is None else body.top_p,
                            max_tokens=body.max_output_tokens, stop_token_ids=STOP_TOKEN_IDS,
                            adapter=card.adapter)
    forced = choice.get("name") if isinstance(choice, dict) else choice
    constraint = await compile_constraint(
        turn_spec(answer, tools.specs, forced, params.max_tokens, tuple(builtins)), answer,
        tools.specs)
    mask = constraint.factory if constraint else None
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0,
             "reasoning_tokens": 0}
    rid, created = _new_id("resp"), int(time.time())
    max_calls = min(body.max_tool_calls or (builtin.max_calls if builtin else 0),
                    builtin.max_calls if builtin else 0)
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
        "tools": tools.echo, "top_p": 1.0 if body.top_p is None else body.top_p,
        "truncation": "disabled", "usage": None, "user": body.user,
        "metadata": body.metadata or {}}
    if builtins:
        response["max_tool_calls"] = body.max_tool_calls

    async def start(ids: list[int], round_params: SamplingParams, round_usage: dict[str, int]
                    ) -> tuple[Any, Any]:
        """A generation's stream and its first item; engine refusals become 4xx/5xx."""
        gen = run_chat(state, ids, round_params, [], round_usage, mask)
        try:
            return gen, await anext(gen)
        except StopAsyncIteration:
            return gen, None
        except (ContextLengthExceeded, QueueFull, ValueError) as exc:
            err = engine_errors(exc)
            if err.code == "context_length_exceeded":
                err.param = "input"
            raise err from exc

    round_usage = dict(usage)
    gen, first = await start(prompt, params, round_usage)
    conversation = conversation or rid
    builder = OutputBuilder(builtins,
                            builtin.annotator(conversation) if builtin and builtins else None)

    async def produce() -> AsyncIterator[dict[str, Any]]:
        nonlocal gen, first, round_usage
        ids, calls, limited = prompt, 0, False
        incomplete: str | None = None
        while True:
            finish, last = None, None
            async for run, evs in prepend(first, gen):
                last = run
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
            for key in usage:
                usage[key] += round_usage[key]
            call = builder.pending_call()
            if call is None:
                break
            spent = usage["completion_tokens"]
            budget = None if body.max_output_tokens is None else body.max_output_tokens - spent
            if finish != "tool_calls" or last is None or (budget is not None and budget <= 0):
                incomplete = "max_output_tokens"  # the call was cut, or no tokens are left
            elif limited:
                incomplete = "max_tool_calls"  # it called again after being told to answer
            if incomplete:
                builder.status = "incomplete"
                for out in builder.finish_builtin(None, False, status="incomplete"):
                    yield out
                break
            recipient, channel, arguments = call
            if calls >= max_calls:  # tell the model, give it one more round to answer
                limited, text = True, (f"Error: the limit of {max_calls} tool calls for this "
                                       "response was reached; answer with what you have.")
                for out in builder.finish_builtin(text, False):
                    yield out
            else:
                calls += 1
                for out in builder.begin_builtin():
                    yield out
                result = await builtin.run(  # type: ignore[union-attr]
                    recipient, arguments, conversation)
                record_tool_call("python" if recipient == "python" else "browser", result.ok)
                text = result.text
                for out in builder.finish_builtin(
                        text, result.ok, url=result.meta.get("url"),
                        sources=[c.url for c in result.citations if c.kind == "search_result"]):
                    yield out
            ids = ids + last.tokens + render_tool_result(recipient, channel, text)
            round_usage = {key: 0 for key in usage}
            gen, first = await start(ids, replace(params, max_tokens=budget), round_usage)
        response["output"] = builder.public_output()
        if incomplete or finish in (None, "length"):
            response["status"] = "incomplete"
            response["incomplete_details"] = {"reason": incomplete or "max_output_tokens"}
        else:
            response["status"] = "completed"
        response["usage"] = {
            "input_tokens": usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": usage["cached_tokens"]},
            "output_tokens": usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": usage["reasoning_tokens"]},
            "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}
        if body.store:
            await asyncio.to_thread(store.put, response, input_items, builder.transcript,
                                    conversation)

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
        except GeneratorExit:  # the client went away: stop generating now
            await gen.aclose()
            raise
        except Exception as exc:  # noqa: BLE001 - the stream has begun: report it in-band
            if isinstance(exc, APIError):  # e.g. the request timeout: expected, no traceback
                logger.warning("response %s failed: %s", rid, exc.message)
            else:
                logger.exception("response %s failed", rid)
            msg = exc.message if isinstance(exc, APIError) else str(exc) or type(exc).__name__
            code = (exc.code or exc.type) if isinstance(exc, APIError) else "server_error"
            response.update(status="failed", output=builder.public_output(),
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
    return {k: v for k, v in stored.response.items() if not k.startswith("_")}


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
