"""Structured outputs end to end: JSON Schema answers and strict tool calls on the tiny random
model (whose unconstrained output is noise), through the official `openai` client, streamed and
not, Chat Completions and Responses. Every completed answer must validate with `jsonschema`."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jsonschema
import openai
import pytest

from ossrt.engine.async_engine import AsyncEngine
from ossrt.engine.llm_engine import EngineConfig, LLMEngine
from ossrt.harmony.tokenizer import get_tokenizer
from ossrt.model import load_model, preset, write_checkpoint
from ossrt.server.app import create_app
from ossrt.server.state import ModelCard, ServerState

MODEL = "gpt-oss-test"
MAX_TOKENS = 120

WORD = {"type": "string", "maxLength": 6}
DIGIT = {"type": "integer", "minimum": 0, "maximum": 9}


def obj(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {"type": "object", "properties": props,
            "required": list(props) if required is None else required,
            "additionalProperties": False}


SCHEMAS: dict[str, dict[str, Any]] = {
    "flat": obj({"name": WORD, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                 "ok": {"type": "boolean"}}),
    "nested": obj({"user": obj({"id": DIGIT, "name": WORD}), "meta": obj({"tag": WORD})}),
    "array_bounds": obj({"xs": {"type": "array", "items": DIGIT, "minItems": 2,
                                "maxItems": 4}}),
    "enum": obj({"color": {"enum": ["red", "green", "blue"]},
                 "size": {"type": "string", "enum": ["S", "M", "L"]}}),
    "const": obj({"version": {"const": 2}, "kind": {"const": "point"}}),
    "any_of": obj({"v": {"anyOf": [DIGIT, WORD, {"type": "null"}]}}),
    "nullable": obj({"note": {"type": ["string", "null"], "maxLength": 5},
                     "n": {"type": ["integer", "null"], "minimum": 0, "maximum": 99}}),
    "recursive_ref": {"$defs": {"node": obj({
        "v": DIGIT, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"},
                             "maxItems": 1}})}, "$ref": "#/$defs/node"},
    "array_of_objects": obj({"items": {"type": "array", "maxItems": 3,
                                       "items": obj({"k": WORD, "v": DIGIT})}}),
    "pattern": obj({"code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"}}),
    "optional_props": obj({"a": DIGIT, "b": WORD, "c": {"type": "boolean"}}, required=["a"]),
    "tuple": obj({"pair": {"type": "array", "prefixItems": [DIGIT, WORD], "items": False,
                           "minItems": 2}}),
}
TOOL_PARAMS = obj({"city": WORD, "days": {"type": "integer", "minimum": 1, "maximum": 7},
                   "unit": {"enum": ["c", "f"]}})


@pytest.fixture(scope="module")
def client(tmp_path_factory, live_server, one_thread) -> Iterator[openai.OpenAI]:
    ckpt = tmp_path_factory.mktemp("structured-ckpt")
    write_checkpoint(preset("tiny"), ckpt, seed=5)
    engine = LLMEngine(load_model(ckpt, "float32", progress=False),
                       EngineConfig(kv_cache_bytes=64 << 20, max_num_seqs=16))
    front = AsyncEngine(engine)
    state = ServerState(engine=front, tokenizer=get_tokenizer(),
                        models=[ModelCard(id=MODEL, max_model_len=engine.max_model_len)])
    with live_server(create_app(state)) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    front.close()


def _chat(client: openai.OpenAI, schema_name: str | None, seed: int, stream: bool,
          max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
    """-> {"finish", "text", "reasoning", "args"} from one chat request."""
    kwargs: dict[str, Any] = dict(model=MODEL, seed=seed, max_tokens=max_tokens,
                                  messages=[{"role": "user", "content": "Reply in JSON."}])
    if schema_name is None:  # a strict tool call, forced
        kwargs.update(tools=[{"type": "function", "function": {
            "name": "forecast", "parameters": TOOL_PARAMS, "strict": True}}],
            tool_choice="required")
    else:
        kwargs["response_format"] = {"type": "json_schema", "json_schema": {
            "name": schema_name, "schema": SCHEMAS[schema_name], "strict": True}}
    if not stream:
        r = client.chat.completions.create(**kwargs)
        msg = r.choices[0].message
        calls = msg.tool_calls or []
        return {"finish": r.choices[0].finish_reason, "text": msg.content,
                "reasoning": getattr(msg, "reasoning_content", None) or "",
                "args": [c.function.arguments for c in calls]}
    text, reasoning, args, finish = "", "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            d = c.delta
            text += d.content or ""
            reasoning += getattr(d, "reasoning_content", None) or ""
            for tc in d.tool_calls or []:
                args[tc.index] = args.get(tc.index, "") + (tc.function.arguments or "")
            finish = c.finish_reason or finish
    return {"finish": finish, "text": text, "reasoning": reasoning,
            "args": [args[k] for k in sorted(args)]}


def _responses(client: openai.OpenAI, schema_name: str | None, seed: int, stream: bool
               ) -> dict[str, Any]:
    """The Responses API has no seed: its requests sample from fresh entropy."""
    kwargs: dict[str, Any] = dict(model=MODEL, input="Reply in JSON.",
                                  max_output_tokens=MAX_TOKENS, store=False)
    if schema_name is None:
        kwargs.update(tools=[{"type": "function", "name": "forecast",
                              "parameters": TOOL_PARAMS, "strict": True}],
                      tool_choice="required")
    else:
        kwargs["text"] = {"format": {"type": "json_schema", "name": schema_name,
                                     "schema": SCHEMAS[schema_name], "strict": True}}
    if stream:
        final = None
        for ev in client.responses.create(stream=True, **kwargs):
            if ev.type in ("response.completed", "response.incomplete"):
                final = ev.response
        r = final
    else:
        r = client.responses.create(**kwargs)
    reasoning = "".join(c.text for item in r.output if item.type == "reasoning"
                        for c in item.content or [])
    args = [item.arguments for item in r.output if item.type == "function_call"]
    finish = {"completed": "stop", "incomplete": "length"}[r.status]
    return {"finish": finish if not args or finish == "length" else "tool_calls",
            "text": r.output_text, "reasoning": reasoning, "args": args}


def test_hundred_requests_every_completed_answer_validates(client: openai.OpenAI) -> None:
    rng = random.Random(0)
    names: list[str | None] = [*SCHEMAS, None]  # None: a strict, forced tool call
    jobs = []
    for i in range(100):
        name = names[i % len(names)]
        api = ("chat", "responses")[i % 2]
        stream = bool((i // 2) % 2)
        jobs.append((name, api, stream, rng.randrange(1 << 30)))

    def run(job: tuple[str | None, str, bool, int]) -> tuple[Any, ...]:
        name, api, stream, seed = job
        out = (_chat if api == "chat" else _responses)(client, name, seed, stream)
        return job, out

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, jobs))

    completed, with_reasoning = 0, 0
    for (name, api, stream, seed), out in results:
        where = f"{api} stream={stream} schema={name} seed={seed}: {out}"
        if out["finish"] == "length":
            continue
        completed += 1
        if name is None:
            assert out["finish"] == "tool_calls" and len(out["args"]) == 1, where
            jsonschema.validate(json.loads(out["args"][0]), TOOL_PARAMS)
        else:
            assert out["finish"] == "stop" and not out["args"], where
            jsonschema.validate(json.loads(out["text"]), SCHEMAS[name])
        if out["reasoning"]:
            with_reasoning += 1
            with pytest.raises(ValueError):  # the reasoning is free text, never held to JSON
                json.loads(out["reasoning"])
    print(f"{completed} of 100 completed, {with_reasoning} with reasoning")
    assert completed >= 80, f"only {completed} of 100 requests completed within max_tokens"
    assert with_reasoning >= 20, "the constrained turns should still reason first"


def test_json_object_gives_an_object(client: openai.OpenAI) -> None:
    for seed in range(3):
        r = client.chat.completions.create(
            model=MODEL, seed=seed, max_tokens=MAX_TOKENS, response_format={"type": "json_object"},
            messages=[{"role": "user", "content": "JSON please"}])
        if r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_named_tool_choice_forces_that_call(client: openai.OpenAI) -> None:
    other = {"type": "function", "function": {"name": "other", "parameters": obj({"x": DIGIT})}}
    forecast = {"type": "function", "function": {"name": "forecast", "parameters": TOOL_PARAMS,
                                                 "strict": True}}
    for seed in range(3):
        r = client.chat.completions.create(
            model=MODEL, seed=seed, max_tokens=MAX_TOKENS, tools=[other, forecast],
            tool_choice={"type": "function", "function": {"name": "forecast"}},
            messages=[{"role": "user", "content": "weather?"}])
        choice = r.choices[0]
        if choice.finish_reason == "length":
            continue
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        assert call.function.name == "forecast"
        jsonschema.validate(json.loads(call.function.arguments), TOOL_PARAMS)


def test_running_out_of_tokens_inside_the_json_says_length(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "flat", "schema": SCHEMAS["flat"]}}
    r = client.chat.completions.create(model=MODEL, seed=1, max_tokens=12, response_format=fmt,
                                       messages=[{"role": "user", "content": "JSON"}])
    assert r.choices[0].finish_reason == "length"
    with pytest.raises(ValueError):
        json.loads(r.choices[0].message.content or "")
    resp = client.responses.create(
        model=MODEL, input="JSON", max_output_tokens=12, store=False,
        text={"format": {"type": "json_schema", "name": "flat", "schema": SCHEMAS["flat"]}})
    assert resp.status == "incomplete"
    assert resp.incomplete_details.reason == "max_output_tokens"


@pytest.mark.parametrize("keyword,schema", [
    ("uniqueItems", {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}),
    ("not", obj({"a": {"not": {"type": "string"}}})),
    ("propertyNames", {"type": "object", "propertyNames": {"maxLength": 3}}),
])
def test_unsupported_keyword_is_a_400_naming_it(client: openai.OpenAI, keyword: str,
                                                schema: dict[str, Any]) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema", "json_schema": {"name": "s",
                                                                    "schema": schema}})
    body = err.value.body
    assert f"'{keyword}'" in body["message"] and body["param"] == (
        "response_format.json_schema.schema")
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=MODEL, input="x", tools=[
            {"type": "function", "name": "f", "parameters": schema, "strict": True}])
    assert f"'{keyword}'" in err.value.body["message"]
    assert err.value.body["param"] == "tools[0].parameters"


def test_bad_response_format_shapes_are_400s(client: openai.OpenAI) -> None:
    for fmt, param in [({"type": "xml"}, "response_format.type"),
                       ({"type": "json_schema"}, "response_format.json_schema"),
                       ({"type": "json_schema", "json_schema": {"schema": {}}},
                        "response_format.json_schema.name")]:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=MODEL, response_format=fmt,
                                           messages=[{"role": "user", "content": "x"}])
        assert err.value.body["param"] == param
