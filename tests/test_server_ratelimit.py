"""Rate limits per key: requests/min exact under a concurrent burst, token budget with
reconciliation, concurrency cap; OpenAI's 429 shape and x-ratelimit-* headers.

The live server's limiter runs on a frozen clock, so no bucket refills mid-test."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_server_chat import ScriptedEngine, harmony

from ossrt.harmony.tokenizer import RETURN, get_tokenizer
from ossrt.server.app import create_app
from ossrt.server.auth import Authenticator
from ossrt.server.ratelimit import (DEFAULT_OUTPUT_ESTIMATE, RateLimiter, Tier, estimate_cost,
                                    format_reset, load_tiers)
from ossrt.server.state import ModelCard, ServerState

MODEL = "scripted"
ANSWER = "<|channel|>final<|message|>Hi!"
KEYS = {"k-burst-a": "burst", "k-burst-b": "burst", "k-tok": "tok", "k-conc": "conc",
        "k-free": "unlisted"}
TIERS = {"burst": Tier("burst", requests_per_minute=3),
         "tok": Tier("tok", tokens_per_minute=1000),
         "conc": Tier("conc", max_concurrent_requests=2)}


class SlowEngine(ScriptedEngine):
    """Waits `delay` seconds before each token; replies with ANSWER when out of scripts."""

    delay = 0.0

    def generate(self, prompt_token_ids, params, request_id=None, mask_provider=None):  # noqa
        if not self.scripts:
            self.scripts.append(harmony(ANSWER, RETURN))
        return super().generate(prompt_token_ids, params, request_id, mask_provider)

    async def _replay(self, script, params, n_prompt):  # noqa: ANN001, ANN202
        async for out in super()._replay(script, params, n_prompt):
            await asyncio.sleep(self.delay)
            yield out


@pytest.fixture(scope="module")
def limited(live_server):
    engine = SlowEngine()
    state = ServerState(engine=engine, tokenizer=get_tokenizer(), models=[ModelCard(id=MODEL)],
                        auth=Authenticator(KEYS), rate_limits=RateLimiter(TIERS, clock=lambda: 0.0))
    with live_server(create_app(state)) as url:
        yield url, engine


def chat(url: str, key: str, max_tokens: int | None = 5, **extra) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return httpx.post(url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {key}"}, timeout=30)


def test_burst_gets_exactly_n_and_headers_count_down(limited) -> None:
    url, _ = limited
    with ThreadPoolExecutor(8) as pool:
        rs = list(pool.map(lambda _: chat(url, "k-burst-a"), range(8)))
    ok = [r for r in rs if r.status_code == 200]
    refused = [r for r in rs if r.status_code == 429]
    assert len(ok) == 3 and len(refused) == 5
    assert sorted(r.headers["x-ratelimit-remaining-requests"] for r in ok) == ["0", "1", "2"]
    for r in ok + refused:
        assert r.headers["x-ratelimit-limit-requests"] == "3"
        assert r.headers["x-ratelimit-reset-requests"].endswith("s")
        assert "x-ratelimit-limit-tokens" not in r.headers  # this tier has no token limit
    for r in refused:
        assert r.json() == {"error": {"message": r.json()["error"]["message"], "type": "requests",
                                      "param": None, "code": "rate_limit_exceeded"}}
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
        assert int(r.headers["retry-after"]) >= 1
    assert "retry-after" not in ok[0].headers

    # another key on the same tier has its own budget, counting down 2, 1, 0
    seen = [chat(url, "k-burst-b").headers["x-ratelimit-remaining-requests"] for _ in range(3)]
    assert seen == ["2", "1", "0"]
    # the official client surfaces the 429 as RateLimitError
    client = openai.OpenAI(base_url=url + "/v1", api_key="k-burst-a", max_retries=0)
    with pytest.raises(openai.RateLimitError) as exc:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert exc.value.code == "rate_limit_exceeded"
    # a key whose tier is not configured is unlimited; non-generation routes are not counted
    assert chat(url, "k-free").status_code == 200
    assert httpx.get(url + "/v1/models",
                     headers={"Authorization": "Bearer k-burst-a"}).status_code == 200
    metrics = httpx.get(url + "/metrics", headers={"Authorization": "Bearer k-free"}).text
    [fam] = [f for f in text_string_to_metric_families(metrics)
             if f.name == "ossrt_rate_limit_rejections"]
    counts = {(s.labels["type"], s.labels["tier"]): s.value for s in fam.samples
              if s.name.endswith("_total")}
    assert counts[("requests", "burst")] == 6


def test_token_budget_with_reconciliation(limited) -> None:
    url, engine = limited
    tok = get_tokenizer()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 600}
    cost = estimate_cost("/v1/chat/completions", body, lambda t: len(tok.encode(t)))
    engine.scripts.append(harmony(ANSWER, RETURN))
    r1 = chat(url, "k-tok", 600)
    assert r1.status_code == 200
    assert r1.headers["x-ratelimit-limit-tokens"] == "1000"
    assert r1.headers["x-ratelimit-remaining-tokens"] == str(1000 - cost)
    actual = r1.json()["usage"]["total_tokens"]
    assert actual < 600 and actual == len(engine.prompts[-1]) + r1.json()["usage"][
        "completion_tokens"]
    # r1 was refunded its unused output: the same request fits again (it would not otherwise)
    r2 = chat(url, "k-tok", 600)
    assert r2.status_code == 200, r2.text
    assert r2.headers["x-ratelimit-remaining-tokens"] == str(1000 - actual - cost)
    left = 1000 - 2 * actual
    bad = chat(url, "k-tok", 5, temperature=7)  # fails validation: its charge is refunded
    assert bad.status_code == 400
    # a request whose max tokens exceed what is left is refused, and refunds nothing
    r3 = chat(url, "k-tok", left)
    assert r3.status_code == 429
    assert r3.json()["error"]["type"] == "tokens"
    assert r3.json()["error"]["code"] == "rate_limit_exceeded"
    assert r3.headers["x-ratelimit-remaining-tokens"] == str(left)
    assert int(r3.headers["retry-after"]) >= 1
    prompt_estimate = cost - 600
    r4 = chat(url, "k-tok", left - prompt_estimate)  # exactly what is left: admitted
    assert r4.status_code == 200, r4.text
    assert r4.headers["x-ratelimit-remaining-tokens"] == "0"
    left -= r4.json()["usage"]["total_tokens"]
    assert chat(url, "k-tok", 1).headers["x-ratelimit-remaining-tokens"] == str(
        left - prompt_estimate - 1)


def test_streams_reconcile_and_concurrency_cap(limited) -> None:
    url, engine = limited
    engine.delay = 0.15
    try:
        with ThreadPoolExecutor(3) as pool:
            futs = [pool.submit(chat, url, "k-conc", 5, stream=True) for _ in range(2)]
            time.sleep(0.3)  # both are generating now
            third = pool.submit(chat, url, "k-conc", 5).result()
            firsts = [f.result() for f in futs]
    finally:
        engine.delay = 0.0
    assert [r.status_code for r in firsts] == [200, 200]
    assert third.status_code == 429
    err = third.json()["error"]
    assert err["type"] == "requests" and "concurrent" in err["message"]
    assert third.headers["retry-after"] == "1"
    assert chat(url, "k-conc").status_code == 200  # slots are freed when streams end


def test_token_bucket_refills_and_reset_format() -> None:
    now = [0.0]
    lim = RateLimiter({"t": Tier("t", requests_per_minute=2, tokens_per_minute=600)},
                      clock=lambda: now[0])
    assert lim.admit("a", "t", 500).allowed
    d = lim.admit("a", "t", 200)
    assert not d.allowed and d.kind == "tokens" and d.retry_after == pytest.approx(10.0)
    assert d.headers["x-ratelimit-reset-tokens"] == "50s"
    now[0] = 10.0  # 100 tokens and 1/3 request back
    assert lim.admit("a", "t", 200).allowed
    d = lim.admit("a", "t", 1)
    assert not d.allowed and d.kind == "requests"
    assert d.headers["x-ratelimit-remaining-requests"] == "0"
    assert lim.admit("b", "t", 600).allowed  # another key
    assert not lim.admit("b", "t", 601).allowed  # more than a whole minute's budget
    lim.release("a", "t", 200, 50)  # reconciled: 150 back
    assert lim.admit("a", "t", 1).allowed is False  # still out of requests
    assert lim.admit("c", "nope", 10 ** 9).allowed  # unknown tier: unlimited
    assert [format_reset(s) for s in (0.02, 1.5, 6.0, 360.0, 61.2)] == [
        "20ms", "1.5s", "6s", "6m0s", "1m1s"]


def test_estimate_cost_shapes() -> None:
    count = len  # one "token" per character, for the test
    chat_body = {"messages": [{"role": "user", "content": "abcd"}], "max_completion_tokens": 10,
                 "n": 2}
    # every string counts (roles too: they are in the rendered prompt), + 4 a message
    assert estimate_cost("/v1/chat/completions", chat_body, count) == len("user\nabcd") + 24
    assert estimate_cost("/v1/chat/completions", {"messages": [{"content": ""}]}, count) == (
        4 + DEFAULT_OUTPUT_ESTIMATE)  # no max tokens given: an assumed default, reconciled later
    assert estimate_cost("/v1/responses", {"input": "abc", "instructions": "xy",
                                           "max_output_tokens": 7}, count) == 6 + 4 + 7
    assert estimate_cost("/v1/completions", {"prompt": [1, 2, 3]}, count) == 3 + 16
    assert estimate_cost("/v1/completions", {"prompt": ["ab", "cde"], "max_tokens": 2},
                         count) == 5 + 4
    assert estimate_cost("/v1/completions", "not a dict", count) == 0


def test_load_tiers(tmp_path: Path) -> None:
    example = Path(__file__).parent.parent / "docs" / "rate-limits.example.toml"
    tiers = load_tiers(example)
    assert {f"tier-{i}" for i in range(1, 6)} <= set(tiers)
    assert tiers["tier-1"].batch_queue_limit == 90000
    f = tmp_path / "t.toml"
    f.write_text('[tiers.a]\nrequests_per_minute = 5\n')
    assert load_tiers(f)["a"] == Tier("a", requests_per_minute=5)
    for text, match in [('[tiers.a]\nrpm = 5\n', "unknown field"),
                        ('[tiers.a]\nrequests_per_minute = "5"\n', "non-negative integer"),
                        ('x = 1\n', "tiers"), ('[tiers.a\n', "t.toml")]:
        f.write_text(text)
        with pytest.raises(ValueError, match=match):
            load_tiers(f)
    assert json.dumps(TIERS["burst"].requests_per_minute) == "3"
