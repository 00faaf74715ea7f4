"""Built-in tools through the Responses API (official client): the model is scripted (Harmony
tokens), the tools are real (bubblewrap python sandbox, local-corpus browser)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
from test_server_chat import ScriptedEngine, harmony

from ossrt.harmony.tokenizer import CALL, RETURN, get_tokenizer
from ossrt.server.agent import configure_builtins
from ossrt.server.app import create_app
from ossrt.server.state import ModelCard, ServerState
from ossrt.server.store import ResponseStore
from ossrt.tools import sandbox_available

MODEL = "scripted"
CODE = "print(6 * 7)"
PY_CALL = ("<|channel|>analysis<|message|>Compute it.<|end|>"
           f"<|start|>assistant<|channel|>analysis to=python code<|message|>{CODE}")
ANSWER = "<|channel|>final<|message|>It is 42."
needs_sandbox = pytest.mark.skipif(not sandbox_available()[0],
                                   reason=f"no bubblewrap sandbox: {sandbox_available()[1]}")


@pytest.fixture(scope="module")
def served(live_server, tmp_path_factory) -> Iterator[tuple[openai.OpenAI, ScriptedEngine]]:
    data = tmp_path_factory.mktemp("agent-data")
    corpus = data / "corpus"
    corpus.mkdir()
    (corpus / "tides.md").write_text("# Tides\n\nThe tide at Saint-Malo rises 13 metres.\n"
                                     "Spring tides are the largest.\n")
    (corpus / "bread.md").write_text("# Bread\n\nSourdough needs a starter.\n")
    engine = ScriptedEngine()
    tools, _ = configure_builtins(data, corpus=str(corpus), max_calls=2)
    state = ServerState(engine=engine, tokenizer=get_tokenizer(), models=[ModelCard(id=MODEL)],
                        store=ResponseStore(data), builtin_tools=tools)
    with live_server(create_app(state)) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0), engine


PYTHON_TOOL = [{"type": "code_interpreter", "container": {"type": "auto"}}]


@needs_sandbox
def test_python_call_then_answer_streams_the_right_events(served) -> None:
    client, engine = served
    engine.scripts += [harmony(PY_CALL, CALL), harmony(ANSWER, RETURN)]
    events = list(client.responses.create(model=MODEL, input="What is 6*7? Use python.",
                                          tools=PYTHON_TOOL, stream=True))
    kinds = [e.type for e in events]
    ci = [k for k in kinds if "code_interpreter" in k]
    assert ci == ["response.code_interpreter_call.in_progress",
                  *["response.code_interpreter_call_code.delta"] * ci.count(
                      "response.code_interpreter_call_code.delta"),
                  "response.code_interpreter_call_code.done",
                  "response.code_interpreter_call.interpreting",
                  "response.code_interpreter_call.completed"]
    assert "".join(e.delta for e in events
                   if e.type == "response.code_interpreter_call_code.delta") == CODE
    assert kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    out = events[-1].response.output
    assert [o.type for o in out] == ["reasoning", "code_interpreter_call", "message"]
    call = out[1]
    assert call.status == "completed" and call.code == CODE
    assert call.outputs[0].type == "logs" and call.outputs[0].logs.strip() == "42"
    assert out[2].content[0].text == "It is 42."
    # the second generation continued the first exactly: prompt + its tokens + the tool result
    first, second = engine.prompts[-2:]
    tok = get_tokenizer()
    assert second[:len(first)] == first
    tail = tok.decode(second[len(first):])
    assert tail.startswith(PY_CALL) and "<|call|><|start|>python to=assistant<|channel|>" \
        "analysis<|message|>42" in tail and tail.endswith("<|end|><|start|>assistant")
    # items in the done events equal the final output
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert [d.id for d in done] == [o.id for o in out]


@needs_sandbox
def test_stored_chain_replays_the_tool_round(served) -> None:
    client, engine = served
    engine.scripts += [harmony(PY_CALL, CALL), harmony(ANSWER, RETURN)]
    first = client.responses.create(model=MODEL, input="6*7?", tools=PYTHON_TOOL)
    assert first.status == "completed"
    assert "_tool_transcript" not in client.responses.retrieve(first.id).model_dump()
    engine.scripts.append(harmony("<|channel|>final<|message|>Yes.", RETURN))
    client.responses.create(model=MODEL, input="Sure?", previous_response_id=first.id,
                            tools=PYTHON_TOOL)
    replay = get_tokenizer().decode(engine.prompts[-1])
    assert f"<|start|>assistant to=python<|channel|>analysis code<|message|>{CODE}<|call|>" \
        in replay
    assert "<|start|>python to=assistant<|channel|>analysis<|message|>42" in replay


def test_browser_search_open_and_citations(served) -> None:
    client, engine = served
    search = ("<|channel|>analysis<|message|>Look it up.<|end|><|start|>assistant"
              "<|channel|>analysis to=browser.search code<|message|>{\"query\": \"tide Saint-Malo\"}")
    open_ = ("<|channel|>analysis to=browser.open code<|message|>{\"id\": 0}")
    answer = "<|channel|>final<|message|>About 13 metres 【1†L2-L3】."
    engine.scripts += [harmony(search, CALL), harmony(open_, CALL), harmony(answer, RETURN)]
    r = client.responses.create(model=MODEL, input="How high is the tide at Saint-Malo?",
                                tools=[{"type": "web_search_preview"}])
    assert r.status == "completed"
    kinds = [o.type for o in r.output]
    assert kinds == ["reasoning", "web_search_call", "web_search_call", "message"]
    s, o = r.output[1], r.output[2]
    assert s.action.type == "search" and s.action.query == "tide Saint-Malo"
    assert s.action.sources and s.action.sources[0].url.endswith("tides.md")
    assert o.action.type == "open_page" and o.action.url.endswith("tides.md")
    note = r.output[3].content[0].annotations[0]
    assert note.type == "url_citation" and note.url.endswith("tides.md")
    text = r.output[3].content[0].text
    assert text[note.start_index:note.end_index] == "【1†L2-L3】"
    # what the model read after the search: the corpus page ranked first
    page = get_tokenizer().decode(engine.prompts[-2]).rpartition(
        "<|start|>browser.search to=assistant<|channel|>analysis<|message|>")[2]
    results = [line for line in page.splitlines() if "【" in line and "†" in line]
    assert "【0†Tides" in results[0]


def _tool_calls(client: openai.OpenAI, tool: str, outcome: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(str(client.base_url).removesuffix("/v1/") + "/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text)
               for s in f.samples if s.name == "ossrt_tool_calls_total"
               and s.labels == {"tool": tool, "outcome": outcome})


def test_tool_call_limit_lets_the_model_answer(served) -> None:
    client, engine = served
    before = _tool_calls(client, "browser", "ok")
    call = ("<|channel|>analysis to=browser.search code<|message|>{\"query\": \"tide\"}")
    engine.scripts += [harmony(call, CALL)] * 3 + [harmony(ANSWER, RETURN)]
    r = client.responses.create(model=MODEL, input="tide?", max_tool_calls=2,
                                tools=[{"type": "web_search_preview"}])
    calls = [o for o in r.output if o.type == "web_search_call"]
    assert [c.status for c in calls] == ["completed", "completed", "failed"]
    assert _tool_calls(client, "browser", "ok") == before + 2  # the refused third never ran
    assert "limit of 2 tool calls" in get_tokenizer().decode(engine.prompts[-1])
    assert r.status == "completed" and r.output[-1].content[0].text == "It is 42."


def test_calling_again_after_the_limit_ends_incomplete(served) -> None:
    client, engine = served
    call = ("<|channel|>analysis to=browser.search code<|message|>{\"query\": \"tide\"}")
    engine.scripts += [harmony(call, CALL)] * 3
    r = client.responses.create(model=MODEL, input="tide?", max_tool_calls=1,
                                tools=[{"type": "web_search_preview"}])
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_tool_calls"
    assert [o.status for o in r.output] == ["completed", "failed", "incomplete"]


def test_tools_not_enabled_or_unknown_are_400(live_server, tmp_path) -> None:
    state = ServerState(engine=ScriptedEngine(), tokenizer=get_tokenizer(),
                        models=[ModelCard(id=MODEL)], store=ResponseStore(tmp_path))
    with live_server(create_app(state)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        for tool, words in [({"type": "web_search_preview"}, "--browser-corpus"),
                            ({"type": "code_interpreter", "container": {"type": "auto"}},
                             "code_interpreter is not enabled")]:
            with pytest.raises(openai.BadRequestError) as err:
                client.responses.create(model=MODEL, input="x", tools=[tool])
            assert err.value.body["code"] == "tool_not_enabled" and words in err.value.message
            assert err.value.body["param"] == "tools[0].type"
        with pytest.raises(openai.BadRequestError) as err:
            client.responses.create(model=MODEL, input="x", tools=[{"type": "file_search"}])
        assert err.value.body["code"] == "unsupported_tool"


def test_python_off_without_sandbox_says_why(tmp_path) -> None:
    from unittest import mock

    with mock.patch("ossrt.tools.sandbox_available", return_value=(False, "no bwrap here")):
        tools, banner = configure_builtins(tmp_path, browser=False)
    assert tools.python is None and "no bwrap here" in tools.python_off
    assert "--unsafe-python" in tools.python_off and "code_interpreter off" in banner


@needs_sandbox
def test_tool_state_lives_as_long_as_the_response_chain(live_server, tmp_path) -> None:
    """Stateful python: a file written in one response is there in a chained one (same
    conversation), and not in an unrelated response."""
    engine = ScriptedEngine()
    tools, _ = configure_builtins(tmp_path, browser=False, python_stateful=True)
    state = ServerState(engine=engine, tokenizer=get_tokenizer(), models=[ModelCard(id=MODEL)],
                        store=ResponseStore(tmp_path), builtin_tools=tools)

    def call(code: str) -> list[int]:
        return harmony(f"<|channel|>analysis to=python code<|message|>{code}", CALL)

    write = "open('/mnt/data/note.txt', 'w').write('kept')"
    read = "print(open('/mnt/data/note.txt').read())"
    with live_server(create_app(state)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        engine.scripts += [call(write), harmony(ANSWER, RETURN)]
        first = client.responses.create(model=MODEL, input="a", tools=PYTHON_TOOL)
        engine.scripts += [call(read), harmony(ANSWER, RETURN)]
        second = client.responses.create(model=MODEL, input="b", tools=PYTHON_TOOL,
                                         previous_response_id=first.id)
        engine.scripts += [call(read), harmony(ANSWER, RETURN)]
        third = client.responses.create(model=MODEL, input="c", tools=PYTHON_TOOL,
                                        previous_response_id=second.id)
        engine.scripts += [call(read), harmony(ANSWER, RETURN)]
        other = client.responses.create(model=MODEL, input="d", tools=PYTHON_TOOL)
    logs = [[o for o in r.output if o.type == "code_interpreter_call"][0].outputs[0].logs
            for r in (second, third, other)]
    assert logs[0].strip() == "kept" and logs[1].strip() == "kept"
    assert "FileNotFoundError" in logs[2]
