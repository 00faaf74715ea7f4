"""The HTTP API through the official `openai` client against a live server on a tiny model."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from ossrt.engine.async_engine import AsyncEngine
from ossrt.engine.llm_engine import EngineConfig, LLMEngine
from ossrt.harmony.tokenizer import get_tokenizer
from ossrt.model import load_model, preset, write_checkpoint
from ossrt.server.app import create_app
from ossrt.server.state import ModelCard, ServerState

MODEL = "gpt-oss-test"
LIVE: dict = {}  # the running LLMEngine, for checks behind the API


@pytest.fixture(scope="module")
def base_url(tmp_path_factory, live_server) -> Iterator[str]:
    ckpt = tmp_path_factory.mktemp("server-ckpt")
    write_checkpoint(preset("tiny"), ckpt, seed=3)
    engine = LLMEngine(load_model(ckpt, "float32", progress=False),
                       EngineConfig(kv_cache_bytes=32 << 20, max_queue_len=64))
    front = AsyncEngine(engine)
    state = ServerState(engine=front, tokenizer=get_tokenizer(),
                        models=[ModelCard(id=MODEL, max_model_len=engine.max_model_len)])
    LIVE["engine"] = engine
    with live_server(create_app(state)) as url:
        yield url
    front.close()
    LIVE.clear()


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)


def test_models(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("nope")
    assert err.value.body["code"] == "model_not_found"


def test_completion_matches_engine_greedy(client: openai.OpenAI) -> None:
    a = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=6,
                                  temperature=0, logprobs=2)
    b = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=6,
                                  temperature=0)
    assert a.object == "text_completion" and a.choices[0].finish_reason == "length"
    assert a.choices[0].text == b.choices[0].text and a.choices[0].text
    assert a.usage.completion_tokens == 6 and a.usage.prompt_tokens == 2
    lp = a.choices[0].logprobs
    assert len(lp.tokens) == 6 and "".join(lp.tokens) == a.choices[0].text
    assert all(len(t) == 2 for t in lp.top_logprobs)
    assert lp.text_offset[0] == 0


def test_completion_stream_equals_non_stream(client: openai.OpenAI) -> None:
    full = client.completions.create(model=MODEL, prompt="One two", max_tokens=8,
                                     temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt="One two", max_tokens=8,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == 8
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_completion_stop_string_cuts_text(client: openai.OpenAI) -> None:
    full = client.completions.create(model=MODEL, prompt="abc", max_tokens=12, temperature=0)
    text = full.choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop
    cut = client.completions.create(model=MODEL, prompt="abc", max_tokens=12, temperature=0,
                                    stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="abc", max_tokens=12, temperature=0, stop=stop, stream=True))
    assert streamed == cut.choices[0].text


def test_completion_n_echo_and_token_prompts(client: openai.OpenAI) -> None:
    tok = get_tokenizer()
    out = client.completions.create(model=MODEL, prompt=[tok.encode("Hi"), tok.encode("Yo")],
                                    max_tokens=3, temperature=1, seed=5, n=2, echo=True)
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    assert all(c.text.startswith("Hi") for c in out.choices if c.index < 2)
    assert all(c.text.startswith("Yo") for c in out.choices if c.index >= 2)


def test_errors_have_openai_shape(client: openai.OpenAI, base_url: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="x", max_tokens=200000)
    assert err.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="x", temperature=5)
    assert err.value.body["param"] == "temperature"
    r = httpx.post(base_url + "/v1/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as err:
        client.embeddings.create(model=MODEL, input="x")
    assert "embeddings" in err.value.body["message"]


def test_server_imports_no_torch() -> None:
    code = ("import sys, ossrt.server.app, ossrt.server.routes_completions; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_chat_on_the_live_model(client: openai.OpenAI) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    full = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10,
                                          temperature=0, logprobs=True, top_logprobs=2)
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    assert full.usage.completion_tokens == 10 and full.usage.prompt_tokens > 20
    assert len(full.choices[0].logprobs.content) == 10
    assert all(len(t.top_logprobs) == 2 for t in full.choices[0].logprobs.content)
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == (full.choices[0].message.content or "")
    # The second request shares the system prompt's blocks through the prefix cache.
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
    ("/v1/completions", {"prompt": "Hi"}),
])
def test_client_disconnect_aborts_generation(base_url: str, path: str, body: dict) -> None:
    engine = LIVE["engine"]
    with httpx.stream("POST", base_url + path, json={
            "model": MODEL, "stream": True, "max_tokens": 30000, **body}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:"):
                break
        # (read from this thread while the engine thread moves sequences between its queues)
        assert any(engine.has_unfinished() or time.sleep(0.01) for _ in range(50))
    for _ in range(200):  # the connection is closed: the request must go away by itself
        if not engine.has_unfinished():
            break
        time.sleep(0.02)
    assert not engine.has_unfinished() and engine.kv.usage() == 0.0
