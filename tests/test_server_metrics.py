"""GET /metrics (Prometheus text, one registry per app), the JSON access log, x-request-id."""

from __future__ import annotations

import json
import logging

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_server_chat import ScriptedEngine, harmony

from ossrt.harmony.tokenizer import RETURN, get_tokenizer
from ossrt.server.app import create_app
from ossrt.server.auth import Authenticator
from ossrt.server.state import ModelCard, ServerState

MODEL = "scripted"
REASON_THEN_ANSWER = ("<|channel|>analysis<|message|>Think a bit.<|end|>"
                      "<|start|>assistant<|channel|>final<|message|>Hello there!")
MSGS = [{"role": "user", "content": "hi"}]
ENGINE_STATS = {"queue_length": 3, "running": 2, "preemptions": 1, "kv_cache_usage": 0.25}


def scrape(url: str, **kw) -> dict[str, list]:  # noqa: ANN003
    r = httpx.get(url + "/metrics", **kw)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f.samples for f in text_string_to_metric_families(r.text)}


def total(samples: list, name: str, **labels: str) -> float:
    return sum(s.value for s in samples if s.name == name
               and all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.fixture(scope="module")
def served(live_server):
    engine = ScriptedEngine()
    state = ServerState(engine=engine, tokenizer=get_tokenizer(), models=[ModelCard(id=MODEL)],
                        engine_stats=lambda: ENGINE_STATS)
    with live_server(create_app(state)) as url:
        yield url, engine


def test_counters_match_traffic(served, caplog) -> None:
    url, engine = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    engine.scripts += [harmony(REASON_THEN_ANSWER, RETURN) for _ in range(4)]
    usages = []
    with caplog.at_level(logging.INFO, logger="ossrt.access"):
        for _ in range(2):
            usages.append(client.chat.completions.create(model=MODEL, messages=MSGS).usage)
        chunks = list(client.chat.completions.create(
            model=MODEL, messages=MSGS, stream=True, stream_options={"include_usage": True}))
        usages.append(chunks[-1].usage)
        list(client.chat.completions.create(model=MODEL, messages=MSGS, stream=True))  # no usage
        engine.scripts.append(get_tokenizer().encode(" plain text"))
        usages.append(client.completions.create(model=MODEL, prompt="Say", max_tokens=5).usage)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="nope", messages=MSGS)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "ossrt.access"]
    m = scrape(url)
    req = m["ossrt_requests"]
    assert total(req, "ossrt_requests_total", endpoint="/v1/chat/completions", status="200") == 4
    assert total(req, "ossrt_requests_total", endpoint="/v1/completions", status="200") == 1
    assert total(req, "ossrt_requests_total", endpoint="/v1/chat/completions", status="404") == 1
    assert total(req, "ossrt_requests_total", tier="default") == 6 + total(
        req, "ossrt_requests_total", endpoint="/health")

    tok = m["ossrt_tokens"]
    # the stream without usage is counted too (the route reports it through record_usage)
    assert total(tok, "ossrt_tokens_total", kind="prompt") == sum(map(len, engine.prompts))
    chat_out = usages[0].completion_tokens
    assert total(tok, "ossrt_tokens_total", kind="output") == (
        4 * chat_out + usages[-1].completion_tokens)
    reasoning = usages[0].completion_tokens_details.reasoning_tokens
    assert reasoning > 0
    assert total(tok, "ossrt_tokens_total", kind="reasoning") == 4 * reasoning
    assert total(m["ossrt_time_to_first_token_seconds"],
                 "ossrt_time_to_first_token_seconds_count") == 2
    assert total(m["ossrt_time_per_output_token_seconds"],
                 "ossrt_time_per_output_token_seconds_count") == 5
    for name, value in ENGINE_STATS.items():
        assert total(m[f"ossrt_engine_{name}"], f"ossrt_engine_{name}") == value

    assert len(lines) == 6, json.dumps(lines)
    assert [x["status"] for x in lines] == [200] * 5 + [404]
    assert {x["path"] for x in lines} == {"/v1/chat/completions", "/v1/completions"}
    for x in lines:
        assert x["request_id"].startswith("req_") and x["tier"] == "default"
        assert x["method"] == "POST" and x["duration_ms"] > 0


def test_request_ids(served) -> None:
    url, _ = served
    r = httpx.get(url + "/v1/models")
    assert r.headers["x-request-id"].startswith("req_")
    assert httpx.get(url + "/v1/models").headers["x-request-id"] != r.headers["x-request-id"]
    mine = httpx.get(url + "/v1/models", headers={"x-request-id": "client-abc_123.4"})
    assert mine.headers["x-request-id"] == "client-abc_123.4"
    for bad in ("has space", "x" * 200, "new\u00e9line"):
        got = httpx.get(url + "/v1/models", headers={"x-request-id": bad.encode()})
        assert got.headers["x-request-id"].startswith("req_")
    err = httpx.get(url + "/v1/nothing-here")
    assert err.status_code == 404 and err.headers["x-request-id"].startswith("req_")


def test_registry_per_app_and_metrics_auth(live_server, tmp_path) -> None:
    engine = ScriptedEngine()
    key = "metrics-test-key-42"
    apps = []
    for public in (False, True):
        state = ServerState(engine=engine, tokenizer=get_tokenizer(),
                            models=[ModelCard(id=MODEL)], auth=Authenticator({key: "gold"}),
                            metrics_public=public)
        apps.append(create_app(state))  # a second app must not clash with the first's metrics
    with live_server(apps[0]) as url:
        assert httpx.get(url + "/metrics").status_code == 401
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer no"}
                         ).status_code == 401
        m = scrape(url, headers={"Authorization": f"Bearer {key}"})
        assert total(m["ossrt_auth_failures"], "ossrt_auth_failures_total") == 2
        assert total(m["ossrt_requests"], "ossrt_requests_total", status="401",
                     tier="none") == 2
        assert total(m["ossrt_requests"], "ossrt_requests_total", status="401",
                     endpoint="/v1/models") == 1
        assert "ossrt_engine_running" not in m  # no engine_stats given
    with live_server(apps[1]) as url:
        m = scrape(url)  # public
        assert total(m["ossrt_auth_failures"], "ossrt_auth_failures_total") == 0
        assert httpx.get(url + "/v1/models").status_code == 401  # the rest still needs a key
