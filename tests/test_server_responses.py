"""/v1/responses through the official client, with the scripted engine of test_server_chat:
output items, the streamed event sequence, function calls, previous_response_id chains that
survive a restart (SQLite store), retrieve / delete / input_items, and errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from test_server_chat import REASON_THEN_ANSWER, TOOL_CALL, ScriptedEngine, harmony

from ossrt.harmony.tokenizer import CALL, RETURN, get_tokenizer
from ossrt.server.app import create_app
from ossrt.server.state import ModelCard, ServerState
from ossrt.server.store import DB_NAME, ResponseStore

MODEL = "scripted"
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}}
ANSWER = "Hello! How can I help? 👋"
REASONING = "The user greets. Answer briefly."


def _state(engine: ScriptedEngine, data_dir: Path) -> ServerState:
    return ServerState(engine=engine, tokenizer=get_tokenizer(), models=[ModelCard(id=MODEL)],
                       store=ResponseStore(data_dir))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:  # noqa: ANN001
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def served(live_server, data_dir) -> Iterator[tuple[openai.OpenAI, ScriptedEngine, str]]:
    engine = ScriptedEngine()
    with live_server(create_app(_state(engine, data_dir))) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0), engine, url


def _strip_ids(obj):  # noqa: ANN001, ANN202 - JSON in, JSON out
    if isinstance(obj, dict):
        return {k: _strip_ids(v) for k, v in obj.items()
                if k not in ("id", "created_at", "call_id", "item_id")}
    if isinstance(obj, list):
        return [_strip_ids(v) for v in obj]
    return obj


def test_reasoning_then_final(served) -> None:
    client, engine, _ = served
    engine.scripts.append(harmony(REASON_THEN_ANSWER, RETURN))
    r = client.responses.create(model=MODEL, input="hi", instructions="Be terse.",
                                reasoning={"effort": "low"}, metadata={"k": "v"})
    assert r.id.startswith("resp_") and r.object == "response" and r.status == "completed"
    assert r.output_text == ANSWER
    assert [o.type for o in r.output] == ["reasoning", "message"]
    rs, msg = r.output
    assert rs.id.startswith("rs_") and rs.content[0].text == REASONING and rs.summary == []
    assert msg.id.startswith("msg_") and msg.status == "completed" and msg.role == "assistant"
    assert 0 < r.usage.output_tokens_details.reasoning_tokens < r.usage.output_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.usage.input_tokens == len(engine.prompts[-1])
    assert r.reasoning.effort == "low" and r.instructions == "Be terse."
    assert r.metadata == {"k": "v"} and r.store is True and r.error is None
    prompt = get_tokenizer().decode(engine.prompts[-1])
    assert "Reasoning: low" in prompt and "Be terse." in prompt
    assert prompt.endswith("<|start|>assistant")
    assert client.responses.retrieve(r.id).model_dump() == r.model_dump()


def test_streamed_event_sequence_equals_non_streamed(served) -> None:
    client, engine, _ = served
    engine.scripts += [harmony(REASON_THEN_ANSWER, RETURN), harmony(REASON_THEN_ANSWER, RETURN)]
    full = client.responses.create(model=MODEL, input="hi")
    events = list(client.responses.create(model=MODEL, input="hi", stream=True))
    types = [e.type for e in events]
    seqs = [e.sequence_number for e in events]
    assert seqs == sorted(set(seqs)) and seqs[0] == 0
    rs, msg = "response.reasoning_text.delta", "response.output_text.delta"
    compact = [t for i, t in enumerate(types) if t not in (rs, msg) or types[i - 1] != t]
    assert compact == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added", rs,
        "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added", msg,
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed"]
    assert "".join(e.delta for e in events if e.type == msg) == ANSWER
    assert "".join(e.delta for e in events if e.type == rs) == REASONING
    text_done = next(e for e in events if e.type == "response.output_text.done")
    final = events[-1].response
    assert text_done.text == ANSWER and text_done.item_id == final.output[1].id
    assert text_done.output_index == 1 and text_done.content_index == 0
    assert events[0].response.status == "in_progress" and events[0].response.id == final.id
    assert final.output_text == ANSWER
    assert _strip_ids(final.model_dump()) == _strip_ids(full.model_dump())
    assert client.responses.retrieve(final.id).model_dump() == final.model_dump()


def test_function_call_and_streamed_arguments(served) -> None:
    client, engine, _ = served
    engine.scripts += [harmony(TOOL_CALL, CALL), harmony(TOOL_CALL, CALL)]
    r = client.responses.create(model=MODEL, input="Weather in Paris?", tools=[WEATHER])
    assert [o.type for o in r.output] == ["reasoning", "function_call"]
    call = r.output[1]
    assert call.id.startswith("fc_") and call.call_id and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"} and call.status == "completed"
    assert r.status == "completed" and r.tools[0].name == "get_weather"
    assert "namespace functions" in get_tokenizer().decode(engine.prompts[-1])

    events = list(client.responses.create(model=MODEL, input="Weather in Paris?",
                                          tools=[WEATHER], stream=True))
    deltas = [e for e in events if e.type == "response.function_call_arguments.delta"]
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    added = [e for e in events if e.type == "response.output_item.added"][1]
    assert added.item.type == "function_call" and added.item.name == "get_weather"
    assert len(deltas) > 1 and "".join(d.delta for d in deltas) == done.arguments
    assert json.loads(done.arguments) == {"city": "Paris"}
    assert all(d.item_id == added.item.id and d.output_index == 1 for d in deltas)
    assert events[-1].type == "response.completed"
    assert _strip_ids(events[-1].response.model_dump()) == _strip_ids(r.model_dump())


def test_previous_response_chain_survives_restart(served, live_server, data_dir) -> None:
    client, engine, _ = served
    engine.scripts.append(harmony(TOOL_CALL, CALL))
    first = client.responses.create(model=MODEL, input="Weather in Paris?", tools=[WEATHER],
                                    instructions="FIRST-INSTRUCTIONS")
    call = first.output[-1]
    engine.scripts.append(harmony("<|channel|>final<|message|>It is sunny in Paris.", RETURN))
    second = client.responses.create(
        model=MODEL, previous_response_id=first.id, tools=[WEATHER],
        input=[{"type": "function_call_output", "call_id": call.call_id,
                "output": '{"sky": "sunny"}'}])
    assert second.output_text == "It is sunny in Paris."
    assert second.previous_response_id == first.id and second.instructions is None
    prompt = get_tokenizer().decode(engine.prompts[-1])
    assert "Weather in Paris?" in prompt and "Need the weather first." in prompt
    assert "to=functions.get_weather" in prompt and '"city": "Paris"' in prompt
    assert "functions.get_weather to=assistant" in prompt and '{"sky": "sunny"}' in prompt
    assert "FIRST-INSTRUCTIONS" not in prompt  # instructions are not inherited

    # restart: a new app with a new store object on the same data dir continues the chain
    src = client.responses.retrieve(second.id)
    engine2 = ScriptedEngine()
    engine2.scripts.append(harmony("<|channel|>final<|message|>You're welcome.", RETURN))
    with live_server(create_app(_state(engine2, data_dir))) as url:
        c2 = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        assert c2.responses.retrieve(second.id).model_dump() == src.model_dump()
        third = c2.responses.create(model=MODEL, previous_response_id=second.id,
                                    input="Thanks!")
    assert third.output_text == "You're welcome."
    prompt = get_tokenizer().decode(engine2.prompts[-1])
    assert prompt.index("Weather in Paris?") < prompt.index("It is sunny in Paris.") < (
        prompt.index("Thanks!"))
    assert '{"sky": "sunny"}' in prompt
    assert (data_dir / DB_NAME).is_file()


def test_restart_same_data_dir(live_server, tmp_path) -> None:
    """Two servers one after the other on one data dir: the chain continues."""
    engine = ScriptedEngine()
    engine.scripts.append(harmony("<|channel|>final<|message|>Noted: blue.", RETURN))
    with live_server(create_app(_state(engine, tmp_path))) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        first = c.responses.create(model=MODEL, input="My favourite colour is BLUE-42.")
    engine2 = ScriptedEngine()
    engine2.scripts.append(harmony("<|channel|>final<|message|>Blue.", RETURN))
    with live_server(create_app(_state(engine2, tmp_path))) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        second = c.responses.create(model=MODEL, input="Which colour?",
                                    previous_response_id=first.id)
        assert c.responses.retrieve(first.id).output_text == "Noted: blue."
    assert second.output_text == "Blue."
    prompt = get_tokenizer().decode(engine2.prompts[-1])
    assert "BLUE-42" in prompt and "Noted: blue." in prompt and "Which colour?" in prompt


def test_retrieve_delete_input_items(served) -> None:
    client, engine, url = served
    engine.scripts.append(harmony(REASON_THEN_ANSWER, RETURN))
    r = client.responses.create(model=MODEL, input=[
        {"role": "developer", "content": "Be nice."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}])
    items = client.responses.input_items.list(r.id, order="asc")
    assert [i.type for i in items.data] == ["message", "message"]
    assert [i.role for i in items.data] == ["developer", "user"]
    assert all(i.id for i in items.data) and items.data[1].content[0].text == "hi"
    raw = httpx.get(f"{url}/v1/responses/{r.id}/input_items").json()
    assert raw["object"] == "list" and raw["has_more"] is False
    assert raw["first_id"] == items.data[1].id and raw["last_id"] == items.data[0].id  # desc
    page = httpx.get(f"{url}/v1/responses/{r.id}/input_items?order=asc&limit=1").json()
    assert page["has_more"] is True and len(page["data"]) == 1

    gone = httpx.delete(f"{url}/v1/responses/{r.id}")
    assert gone.status_code == 200
    assert gone.json() == {"id": r.id, "object": "response.deleted", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list(r.id)


def test_store_false_not_retrievable(served) -> None:
    client, engine, _ = served
    engine.scripts.append(harmony(REASON_THEN_ANSWER, RETURN))
    r = client.responses.create(model=MODEL, input="hi", store=False)
    assert r.output_text == ANSWER and r.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.create(model=MODEL, input="again", previous_response_id=r.id)
    assert err.value.body["param"] == "previous_response_id"


def test_max_output_tokens_incomplete(served) -> None:
    client, engine, _ = served
    engine.scripts += [harmony(REASON_THEN_ANSWER, RETURN), harmony(REASON_THEN_ANSWER, RETURN)]
    r = client.responses.create(model=MODEL, input="hi", max_output_tokens=20)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 20 and r.max_output_tokens == 20
    events = list(client.responses.create(model=MODEL, input="hi", max_output_tokens=20,
                                          stream=True))
    assert events[-1].type == "response.incomplete"
    assert _strip_ids(events[-1].response.model_dump()) == _strip_ids(r.model_dump())


def test_errors(served) -> None:
    client, engine, _ = served
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.create(model="nope", input="x")
    assert err.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.create(model=MODEL, input="x", previous_response_id="resp_missing")
    assert err.value.body["param"] == "previous_response_id"
    assert err.value.body["code"] == "previous_response_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=MODEL, input=[{"role": "user", "content": "x"},
                                                    {"type": "wizardry"}])
    assert err.value.body["param"] == "input[1].type"
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=MODEL, input=[{"type": "function_call_output",
                                                     "output": "x"}])
    assert err.value.body["param"] == "input[0].call_id"
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=MODEL, input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": "data:x"}]}])
    assert err.value.body["param"] == "input[0].content[0]"
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=MODEL, input="x", text={"format": {"type": "yaml"}})
    assert err.value.body["param"] == "text.format.type"
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=MODEL, input="x", text={"format": {
            "type": "json_schema", "name": "x", "schema": {"type": "array",
                                                           "uniqueItems": True}}})
    assert err.value.body["param"] == "text.format.schema"
    assert "'uniqueItems' is not supported" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=MODEL, input="x", tools=[{"type": "web_search"}])
    assert err.value.body["param"] == "tools[0].type"
    assert engine.scripts == []  # none of these reached the engine


class FailingEngine(ScriptedEngine):
    """Streams a little reasoning, then dies."""

    async def _replay(self, script, params, n_prompt):  # noqa: ANN001, ANN202
        async for out in super()._replay(script, params, n_prompt):
            if out.finished:
                break
            yield out
        raise RuntimeError("engine fell over")


def test_stream_failure_is_reported_in_band(live_server, tmp_path) -> None:
    engine = FailingEngine()
    engine.scripts.append(get_tokenizer().encode("<|channel|>analysis<|message|>Thinking"))
    with live_server(create_app(_state(engine, tmp_path))) as url:
        with httpx.stream("POST", f"{url}/v1/responses", json={
                "model": MODEL, "input": "hi", "stream": True}) as resp:
            body = "".join(resp.iter_text())
    blocks = [b for b in body.split("\n\n") if b.strip()]
    assert all(b.startswith("event: ") and "\ndata: " in b for b in blocks)
    last = json.loads(blocks[-1].split("\ndata: ", 1)[1])
    assert last["type"] == "response.failed" and last["response"]["status"] == "failed"
    assert "engine fell over" in last["response"]["error"]["message"]
