"""The Batch API through the official client: a batch runs to completion (output and error
files), bad input files fail the batch naming their lines, the per-tier batch queue limit,
ownership and the gateway's trust of the runner, cancel, and resuming after a restart."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from test_server_chat import ScriptedEngine, harmony

from ossrt.harmony.tokenizer import RETURN, get_tokenizer
from ossrt.server.app import create_app
from ossrt.server.auth import Authenticator
from ossrt.server import batches
from ossrt.server.batches import BatchStore
from ossrt.server.ratelimit import RateLimiter, Tier, estimate_cost
from ossrt.server.state import ModelCard, ServerState

MODEL = "scripted"
ANSWER = "<|channel|>final<|message|>Hi from the batch!"
CHAT = "/v1/chat/completions"
KEYS = {"k-small-a": "small", "k-small-b": "small", "k-free": "default"}
LINE_TOKENS = estimate_cost(CHAT, {"messages": [{"role": "user", "content": "hi"}],
                                   "max_tokens": 20},
                            lambda t: len(get_tokenizer().encode(t, allow_special=False)))
QUEUE_LIMIT = 5 * LINE_TOKENS  # a key of tier "small" may have 5 lines' worth enqueued
TIERS = {"small": Tier("small", requests_per_minute=1, batch_queue_limit=QUEUE_LIMIT)}


class GatedEngine(ScriptedEngine):
    """Always answers ANSWER; each generation first waits for `gate` (open by default), and
    the ones after the first `hang_after` wait forever."""

    def __init__(self, hang_after: int | None = None) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()
        self.hang_after = hang_after
        self.started = 0

    def generate(self, prompt_token_ids, params, request_id=None, mask_provider=None):  # noqa
        self.scripts.append(harmony(ANSWER, RETURN))
        return super().generate(prompt_token_ids, params, request_id, mask_provider)

    async def _replay(self, script, params, n_prompt):  # noqa: ANN001, ANN202
        self.started += 1
        hang = self.hang_after is not None and self.started > self.hang_after
        while hang or not self.gate.is_set():
            await asyncio.sleep(0.01)
        async for out in super()._replay(script, params, n_prompt):
            yield out


def line(cid: str, url: str = CHAT, **body) -> dict:
    return {"custom_id": cid, "method": "POST", "url": url,
            "body": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                     "max_tokens": 20, **body}}


def upload(client: openai.OpenAI, lines: list, purpose: str = "batch") -> str:
    raw = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n"
    return client.files.create(file=("in.jsonl", raw.encode()), purpose=purpose).id


def submit(client: openai.OpenAI, lines: list):  # noqa: ANN201 - openai's Batch
    return client.batches.create(input_file_id=upload(client, lines), endpoint=CHAT,
                                 completion_window="24h", metadata={"job": "test"})


def wait(client: openai.OpenAI, batch_id: str, until: tuple[str, ...] = (
        "completed", "failed", "cancelled", "expired"), timeout: float = 30):  # noqa: ANN201
    deadline = time.monotonic() + timeout
    while True:
        b = client.batches.retrieve(batch_id)
        if b.status in until:
            return b
        assert time.monotonic() < deadline, f"batch still {b.status}"
        time.sleep(0.05)


def jsonl(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines() if x]


@pytest.fixture(scope="module")
def served(live_server, tmp_path_factory):
    engine = GatedEngine()
    state = ServerState(engine=engine, tokenizer=get_tokenizer(), models=[ModelCard(id=MODEL)],
                        auth=Authenticator(KEYS),
                        rate_limits=RateLimiter(TIERS, clock=lambda: 0.0),
                        data_dir=str(tmp_path_factory.mktemp("batches")))
    with live_server(create_app(state)) as url:
        yield url, state, engine


def client_for(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def test_batch_runs_to_completion(served) -> None:
    url, state, _ = served
    client = client_for(url, "k-free")
    lines = [line(f"req-{i}", messages=[{"role": "user", "content": f"hello {i}"}])
             for i in range(5)]
    lines.insert(2, line("bad-param", max_tokens=0))  # the route's 400
    lines.append(line("streamed", stream=True))  # refused per line
    created = submit(client, lines)
    assert created.object == "batch" and created.id.startswith("batch_")
    assert created.status == "in_progress" and created.in_progress_at
    assert created.expires_at == created.created_at + 24 * 3600
    assert created.metadata == {"job": "test"}
    done = wait(client, created.id)
    assert done.status == "completed" and done.completed_at and done.finalizing_at
    assert (done.request_counts.total, done.request_counts.completed,
            done.request_counts.failed) == (7, 5, 2)
    out = jsonl(client, done.output_file_id)
    assert [r["custom_id"] for r in out] == [f"req-{i}" for i in range(5)]  # input order
    for r in out:
        assert r["id"].startswith("batch_req_") and r["error"] is None
        assert r["response"]["status_code"] == 200 and r["response"]["request_id"]
        body = r["response"]["body"]
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"] == "Hi from the batch!"
    errs = {r["custom_id"]: r for r in jsonl(client, done.error_file_id)}
    assert set(errs) == {"bad-param", "streamed"}
    bad = errs["bad-param"]["response"]
    assert bad["status_code"] == 400 and bad["body"]["error"]["param"] == "max_tokens"
    assert errs["streamed"]["response"] is None
    assert errs["streamed"]["error"]["code"] == "streaming_unsupported"
    assert client.files.retrieve(done.output_file_id).purpose == "batch_output"
    # The lines were booked to the batch owner's key and tier in /metrics.
    metrics = httpx.get(url + "/metrics", headers={"Authorization": "Bearer k-free"}).text
    assert 'ossrt_requests_total{endpoint="/v1/chat/completions",status="200",tier="default"}' \
        in metrics


@pytest.mark.parametrize("endpoint, body, kind", [
    ("/v1/responses", {"input": "hi", "max_output_tokens": 20}, "response"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4}, "text_completion"),
])
def test_other_endpoints(served, endpoint, body, kind) -> None:
    url, _, _ = served
    c = client_for(url, "k-free")
    lines = [{"custom_id": f"o{i}", "method": "POST", "url": endpoint,
              "body": {"model": MODEL, **body}} for i in range(2)]
    b = c.batches.create(input_file_id=upload(c, lines), endpoint=endpoint,
                         completion_window="24h")
    done = wait(c, b.id)
    assert (done.status, done.request_counts.completed) == ("completed", 2), done.errors
    assert [r["response"]["body"]["object"] for r in jsonl(c, done.output_file_id)] == [kind] * 2


@pytest.mark.parametrize("lines, code, line_no", [
    ([line("a"), line("b", url="/v1/completions")], "mismatched_endpoint", 2),
    ([line("a"), line("b"), line("a")], "duplicate_custom_id", 3),
    ([line("a"), '{"custom_id": "b", "method": "POST",', line("c")], "invalid_json_line", 2),
    ([line("a", model="no-such-model")], "model_not_found", 1),
    ([{**line("a"), "method": "GET"}], "invalid_method", 1),
])
def test_bad_input_fails_naming_the_line(served, lines, code, line_no) -> None:
    url, _, _ = served
    client = client_for(url, "k-free")
    b = submit(client, lines)
    assert b.status == "failed" and b.failed_at
    assert b.errors.object == "list"
    err = b.errors.data[0]
    assert (err.code, err.line) == (code, line_no)
    assert str(line_no) in err.message
    assert client.batches.retrieve(b.id).status == "failed"


def test_bad_requests_get_400(served) -> None:
    url, _, _ = served
    client = client_for(url, "k-free")
    with pytest.raises(openai.BadRequestError, match="No such File"):
        client.batches.create(input_file_id="file-nope", endpoint=CHAT, completion_window="24h")
    tuning = upload(client, [line("a")], purpose="fine-tune")
    with pytest.raises(openai.BadRequestError, match="purpose 'batch'"):
        client.batches.create(input_file_id=tuning, endpoint=CHAT, completion_window="24h")
    good = upload(client, [line("a")])
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        client.batches.create(input_file_id=good, endpoint=CHAT, completion_window="1h")
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        client.batches.create(input_file_id=good, endpoint="/v1/embeddings",
                              completion_window="24h")


def test_batch_queue_limit(served) -> None:
    url, _, engine = served
    a, b = client_for(url, "k-small-a"), client_for(url, "k-small-b")
    engine.gate.clear()  # the runner's lines wait: the first batch stays unfinished
    try:
        first = submit(a, [line(f"a{i}") for i in range(3)])  # 3 of the 5 lines allowed
        assert first.status == "in_progress"
        second = submit(a, [line(f"b{i}") for i in range(3)])  # 6 > 5
        assert second.status == "failed"
        err = second.errors.data[0]
        assert err.code == "token_limit_exceeded"
        assert f"Limit: {QUEUE_LIMIT} enqueued tokens" in err.message
        assert second.request_counts.total == 0
        other = submit(b, [line(f"c{i}") for i in range(3)])  # its own budget
        assert other.status == "in_progress"
        fits = submit(a, [line(f"d{i}") for i in range(2)])  # 3 + 2 = 5: still allowed
        assert fits.status == "in_progress"
    finally:
        engine.gate.set()
    for c, batch in ((a, first), (b, other), (a, fits)):
        assert wait(c, batch.id).status == "completed"
    # The tier allows 1 request a minute, yet its batches ran 8 lines: not rate-limited.
    freed = submit(a, [line(f"e{i}") for i in range(5)])  # all its tokens were freed
    assert freed.status == "in_progress"
    wait(a, freed.id)


def test_ownership_and_internal_header(served) -> None:
    url, state, _ = served
    a, b = client_for(url, "k-small-a"), client_for(url, "k-small-b")
    mine = submit(a, [line("x")])
    with pytest.raises(openai.NotFoundError):
        b.batches.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError):
        b.batches.cancel(mine.id)
    assert mine.id not in {x.id for x in b.batches.list(limit=100)}
    assert mine.id in {x.id for x in a.batches.list(limit=100)}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
    for forged in ("", "0" * 64, state.internal_secret[:-1], state.internal_secret + "0"):
        for method, path, js in (("POST", CHAT, body), ("GET", "/v1/batches", None)):
            r = httpx.request(method, url + path, json=js, headers={
                "x-ossrt-internal": forged, "x-ossrt-batch-owner": "k-small-a"})
            assert r.status_code == 401, (forged, path, r.text)
    r = httpx.post(url + CHAT, json=body, headers={"x-ossrt-internal": state.internal_secret})
    assert r.status_code == 200  # only the process's own secret passes
    wait(a, mine.id)


def test_list_pages_newest_first(served) -> None:
    url, _, _ = served
    c = client_for(url, "k-small-b")
    ids = [submit(c, [line("p")]).id for _ in range(3)]
    page = c.batches.list(limit=2)
    assert [x.id for x in page.data] == ids[::-1][:2] and page.has_more
    rest = c.batches.list(limit=2, after=page.data[-1].id)
    assert rest.data[0].id == ids[0]
    for i in ids:
        wait(c, i)


def test_cancel_keeps_finished_lines(served) -> None:
    url, _, engine = served
    c = client_for(url, "k-free")
    started = engine.started
    engine.gate.clear()
    try:
        b = submit(c, [line(f"q{i}") for i in range(10)])
        deadline = time.monotonic() + 10
        while engine.started < started + 4:  # the runner's 4 lines are in flight
            assert time.monotonic() < deadline
            time.sleep(0.02)
        cancelling = c.batches.cancel(b.id)
        assert cancelling.status == "cancelling" and cancelling.cancelling_at
    finally:
        engine.gate.set()
    done = wait(c, b.id)
    assert done.status == "cancelled" and done.cancelled_at
    out = jsonl(c, done.output_file_id)
    assert len(out) == done.request_counts.completed == 4  # those in flight finished
    assert done.request_counts.total == 10
    assert c.batches.cancel(b.id).status == "cancelled"  # cancelling again changes nothing


def test_expiry_reports_the_lines_not_run(served, monkeypatch) -> None:
    url, state, engine = served
    c = client_for(url, "k-free")
    started = engine.started
    engine.gate.clear()
    try:
        b = submit(c, [line(f"x{i}") for i in range(7)])
        deadline = time.monotonic() + 10
        while engine.started < started + 4:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        later = int(time.time()) + 24 * 3600 + 1
        monkeypatch.setattr(batches, "_now", lambda: later)  # the 24h are over
    finally:
        engine.gate.set()
    done = wait(c, b.id)
    assert done.status == "expired" and done.expired_at
    assert len(jsonl(c, done.output_file_id)) == done.request_counts.completed == 4
    errs = jsonl(c, done.error_file_id)
    assert [e["custom_id"] for e in errs] == ["x4", "x5", "x6"]
    assert {e["error"]["code"] for e in errs} == {"batch_expired"}
    assert done.expired_at == later


def test_restart_resumes_without_redoing(live_server, tmp_path) -> None:
    data = tmp_path / "data"

    def make(engine: GatedEngine):  # noqa: ANN202
        return create_app(ServerState(engine=engine, tokenizer=get_tokenizer(),
                                      models=[ModelCard(id=MODEL)], data_dir=str(data)))

    first = GatedEngine(hang_after=3)  # 3 lines finish, then the server "dies" mid-batch
    with live_server(make(first)) as url:
        c = client_for(url, "x")
        b = submit(c, [line(f"r{i}") for i in range(8)])
        deadline = time.monotonic() + 15
        while c.batches.retrieve(b.id).request_counts.completed < 3 or first.started < 7:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        pending = upload(c, [line("v0"), line("v1")])
    with sqlite3.connect(Path(data) / "batches.sqlite3") as db:
        stored = {r[0] for r in db.execute("SELECT custom_id FROM results")}
    assert len(stored) == 3
    # A batch the dead server left validating (as if it died mid-validation).
    left = {**b.model_dump(), "id": "batch_leftvalidating", "input_file_id": pending,
            "status": "validating", "request_counts": {"total": 0, "completed": 0, "failed": 0}}
    store = BatchStore(data)
    store.create(left, "anonymous", "default")
    store.close()
    second = GatedEngine()
    with live_server(make(second)) as url:
        c = client_for(url, "x")
        done = wait(c, b.id)
        assert done.status == "completed"
        out = jsonl(c, done.output_file_id)
        revalidated = wait(c, left["id"])
        assert revalidated.status == "completed" and revalidated.request_counts.completed == 2
    ids = [r["custom_id"] for r in out]
    assert sorted(ids) == sorted(f"r{i}" for i in range(8)) and len(set(ids)) == 8
    assert second.started == 5 + 2  # only the lines without a stored result ran again (+ v*)
    assert done.request_counts.completed == 8
