"""`--request-timeout`: a generation past its deadline is stopped, its KV blocks are freed, and
the client gets an OpenAI-shaped error (504 before output, in-band once streaming)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from ossrt.engine.async_engine import AsyncEngine
from ossrt.engine.llm_engine import EngineConfig, LLMEngine
from ossrt.engine.sequence import SamplingParams
from ossrt.harmony.tokenizer import get_tokenizer
from ossrt.model import load_model, preset, write_checkpoint
from ossrt.server.app import create_app
from ossrt.server.state import ModelCard, ServerState

MODEL = "gpt-oss-test"
TIMEOUT = 1.5
LONG = 6000  # tokens: far more than the tiny model makes in TIMEOUT seconds
LIVE: dict = {}


@pytest.fixture(scope="module")
def base_url(tmp_path_factory, live_server, one_thread) -> Iterator[str]:
    ckpt = tmp_path_factory.mktemp("timeout-ckpt")
    write_checkpoint(preset("tiny"), ckpt, seed=3)
    engine = LLMEngine(load_model(ckpt, "float32", progress=False),
                       EngineConfig(kv_cache_bytes=32 << 20))
    engine.add_request("warm-up", [1, 2, 3], SamplingParams(max_tokens=2))  # builds kernels
    while engine.has_unfinished():
        engine.step()
    state = ServerState(engine=AsyncEngine(engine), tokenizer=get_tokenizer(),
                        models=[ModelCard(id=MODEL, max_model_len=engine.max_model_len)],
                        request_timeout=TIMEOUT)
    LIVE["engine"] = engine
    app = create_app(state)
    with live_server(app) as url:
        yield url
    state.engine.close()


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)


def _idle() -> bool:
    """The engine has dropped every request and every KV block (within a second)."""
    engine = LIVE["engine"]
    for _ in range(100):
        if not engine.has_unfinished() and engine.kv.usage() == 0:
            return True
        time.sleep(0.01)
    return False


def test_short_request_is_unaffected(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason == "length"


def test_non_streaming_timeout_is_a_504_and_frees_the_request(client: openai.OpenAI) -> None:
    t0 = time.monotonic()
    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "go"}],
                                       max_tokens=LONG, temperature=0)
    assert err.value.status_code == 504
    assert err.value.body["code"] == "request_timeout"
    assert err.value.body["type"] == "server_error"
    assert time.monotonic() - t0 < TIMEOUT + 5
    assert _idle()


def test_streaming_timeout_ends_the_stream_with_an_error(client: openai.OpenAI) -> None:
    chunks = 0
    with pytest.raises(openai.APIError) as err:
        for _ in client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "go"}], max_tokens=LONG,
                temperature=0, stream=True):
            chunks += 1
    assert chunks > 1  # output had started before the deadline
    assert "--request-timeout" in err.value.message
    assert _idle()


def test_completions_stream_timeout_in_band(base_url: str) -> None:
    with httpx.stream("POST", base_url + "/v1/completions", timeout=30, json={
            "model": MODEL, "prompt": "a b c", "max_tokens": LONG, "stream": True}) as r:
        assert r.status_code == 200
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert len(data) > 1 and data[-1] != "[DONE]"
    assert json.loads(data[-1])["error"]["code"] == "request_timeout"
    assert _idle()


def test_responses_stream_timeout_fails_the_response(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model=MODEL, input="go", max_output_tokens=LONG,
                                          stream=True, store=True))
    last = events[-1]
    assert last.type == "response.failed"
    assert last.response.status == "failed" and last.response.error.code == "request_timeout"
    assert _idle()
