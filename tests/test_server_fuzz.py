"""Property-based fuzzing of the HTTP API from its own OpenAPI document (Schemathesis).

Every operation the app documents gets valid and invalid requests (bounded: a few dozen each,
in process through the ASGI transport, with a stub engine that validates prompts like the real
one and answers with a short fixed Harmony turn). No answer may be a 5xx, and every 4xx body
must be OpenAI's error shape. Plus the request-size bound (413) and a few hand-written inputs
that once were 500s."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from starlette.testclient import TestClient
from test_server_chat import ScriptedEngine, harmony

from ossrt.engine.sequence import ContextLengthExceeded, SamplingParams, StepOutput
from ossrt.harmony.tokenizer import RETURN, get_tokenizer
from ossrt.server.app import create_app
from ossrt.server.state import ModelCard, ServerState
from ossrt.server.store import ResponseStore

MODEL = "scripted"
MAX_LEN = 4096
VOCAB = 201088
TURN = harmony("<|channel|>analysis<|message|>Hm.<|end|><|start|>assistant<|channel|>final"
               "<|message|>Fine.", RETURN)
MAX_EXAMPLES = 100


class FuzzEngine(ScriptedEngine):
    """Validates like `LLMEngine.add_request` (token ids, context length), then replays one
    short turn for every request."""

    def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                 request_id: str | None = None, mask_provider=None  # noqa: ANN001
                 ) -> AsyncIterator[StepOutput]:
        return self._checked(list(prompt_token_ids), params)

    async def _checked(self, prompt: list[int], params: SamplingParams
                       ) -> AsyncIterator[StepOutput]:
        bad = [t for t in prompt if not 0 <= t < VOCAB]
        if bad:
            raise ValueError(f"prompt holds token ids outside the vocabulary: {bad[:5]}")
        if len(prompt) + (params.max_tokens or 0) > MAX_LEN:
            raise ContextLengthExceeded(f"{len(prompt)} + {params.max_tokens} > {MAX_LEN}")
        async for out in self._replay(TURN, params, len(prompt)):
            yield out


def make_app():  # noqa: ANN201 - a FastAPI app
    state = ServerState(engine=FuzzEngine(), tokenizer=get_tokenizer(),
                        models=[ModelCard(id=MODEL, max_model_len=MAX_LEN)],
                        store=ResponseStore(None))
    return create_app(state, max_body_bytes=1 << 20)


APP = make_app()


async def without_lifespan(scope, receive, send) -> None:  # noqa: ANN001
    """APP, minus its lifespan: the test client starts and stops the app around every call,
    and the app's shutdown closes its engine and store for good."""
    if scope["type"] != "lifespan":
        await APP(scope, receive, send)
        return
    while True:
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif msg["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


schema = schemathesis.openapi.from_asgi("/openapi.json", without_lifespan)


def assert_openai_error(response) -> None:  # noqa: ANN001 - a requests-like response
    assert response.status_code < 500, (response.status_code, response.text[:2000])
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"}, body
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        assert isinstance(err["message"], str) and err["message"]
        assert isinstance(err["type"], str)
        assert err["param"] is None or isinstance(err["param"], str)
        assert err["code"] is None or isinstance(err["code"], str)


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
          phases=[Phase.explicit, Phase.generate, Phase.shrink],
          suppress_health_check=list(HealthCheck))
def test_api_fuzz(case) -> None:  # noqa: ANN001 - a schemathesis Case
    response = case.call()
    assert_openai_error(response)


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(APP)  # in process; no lifespan, so the shared app stays usable


@pytest.mark.parametrize("body", [
    # These were 500s before: non-list / non-object fields inside free-form messages.
    {"messages": [{"role": "assistant", "tool_calls": 5}]},
    {"messages": [{"role": "assistant", "tool_calls": [7]}]},
    {"messages": [{"role": "assistant", "tool_calls": [{"function": "x"}]}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": {"a": 1}}]}]},
    {"messages": [{"role": "user", "content": 5}]},
    {"messages": [{"role": "tool", "tool_call_id": 5, "content": "x"}]},
    {"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**30},
])
def test_chat_odd_messages_are_400(client: TestClient, body: dict) -> None:
    r = client.post("/v1/chat/completions", json={"model": MODEL, **body})
    assert r.status_code == 400, r.text
    assert_openai_error(r)


@pytest.mark.parametrize("raw", [
    b'"logit_bias": {"1": Infinity}', b'"logit_bias": {"1": NaN}', b'"temperature": NaN',
    b'"top_p": -Infinity', b'"presence_penalty": Infinity',
])
def test_chat_non_finite_numbers_are_400(client: TestClient, raw: bytes) -> None:
    body = b'{"model": "scripted", "messages": [{"role": "user", "content": "x"}], ' + raw + b"}"
    r = client.post("/v1/chat/completions", content=body,
                    headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert_openai_error(r)


def test_huge_seed_is_fine(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={
        "model": MODEL, "seed": 10**30, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("body", [
    {"input": [{"type": "reasoning", "content": 5}]},
    {"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": {"a": 1}},
               {"type": "function_call_output", "call_id": "c", "output": 5}], "seed": 1},
    {"input": "x", "reasoning": {"effort": ["high"]}},
    {"input": "x", "text": {"format": "text"}},
    {"input": "x", "max_output_tokens": 10**30},
    {"input": [{"role": "user", "content": [{"type": "input_text", "text": 5}]}]},
])
def test_responses_odd_input_never_500(client: TestClient, body: dict) -> None:
    r = client.post("/v1/responses", json={"model": MODEL, **body})
    assert r.status_code < 500, r.text
    assert_openai_error(r)


def test_completions_odd_prompts(client: TestClient) -> None:
    for prompt in ([-1], [VOCAB], [[1], []], [], "", [[]], 10**30, [10**30]):
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": prompt})
        assert r.status_code == 400, (prompt, r.text)
        assert_openai_error(r)


def test_body_over_the_limit_is_413_before_parsing(client: TestClient) -> None:
    big = b'{"model": "scripted", "prompt": "' + b"a" * (1 << 20) + b'"}'
    r = client.post("/v1/completions", content=big,
                          headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert_openai_error(r)

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked upload
        for _ in range(20):
            yield b"x" * (64 << 10)
    r = client.post("/v1/responses", content=chunks(),
                          headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert_openai_error(r)
    # Not JSON at all, but too big: still 413 (the size is checked before parsing).
    r = client.post("/v1/chat/completions", content=b"\xff" * ((1 << 20) + 1))
    assert r.status_code == 413
    # Just under the limit is parsed as usual.
    ok = client.post("/v1/completions", json={"model": MODEL, "prompt": "a" * 1000,
                                                    "max_tokens": 2})
    assert ok.status_code == 200, ok.text


def test_huge_fanout_is_refused(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={
        "model": MODEL, "n": 129, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = client.post("/v1/completions", json={
        "model": MODEL, "n": 128, "prompt": [[1]] * 64, "max_tokens": 1})
    assert r.status_code == 400, r.text
    assert_openai_error(r)
