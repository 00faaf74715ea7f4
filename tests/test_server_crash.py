"""`ossrt serve` as a real process on the tiny random checkpoint: stored responses survive a
`kill -9` mid-traffic (every response a client saw complete is retrievable after a restart, and
the SQLite file passes `PRAGMA integrity_check`), and SIGTERM drains open streams, then closes
the engine and the store (no WAL file left behind)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from ossrt.server.store import DB_NAME

pytestmark = pytest.mark.slow
MODEL = "tiny"
OSSRT = str(Path(sys.executable).with_name("ossrt"))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:  # noqa: ANN001
    out = tmp_path_factory.mktemp("tiny-ckpt")
    subprocess.run([OSSRT, "make-checkpoint", "--preset", "tiny", "--out", str(out)],
                   check=True, capture_output=True, timeout=120)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def ossrt_serve(ckpt: Path, data_dir: Path, *extra: str, log: Path | None = None
                ) -> Iterator[tuple[subprocess.Popen, str]]:
    """`ossrt serve` on a free loopback port; yields (process, base url). Stops it (SIGKILL
    if it outlives 20 s after SIGTERM) unless the test already did."""
    port = free_port()
    out = open(log or os.devnull, "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [OSSRT, "serve", "--model", str(ckpt), "--host", "127.0.0.1", "--port", str(port),
         "--data-dir", str(data_dir), "--dtype", "float32", "--served-model-name", MODEL,
         "--kv-cache-gb", "0.25", *extra], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"ossrt serve exited with {proc.returncode}"
            assert time.monotonic() < deadline, "ossrt serve did not come up in 60 s"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        out.close()


def integrity(db: Path) -> str:
    con = sqlite3.connect(db)
    try:
        return con.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        con.close()


async def _store_traffic(url: str, stop: asyncio.Event, done: list[tuple[str, str]],
                         workers: int = 16) -> int:
    """Workers send store:true requests (half streamed) until `stop`; each response the client
    saw finish goes into `done` as (id, status). Returns how many requests failed (expected
    once the server is killed)."""
    failures = 0

    async def worker(c: httpx.AsyncClient, w: int) -> None:
        nonlocal failures
        k = 0
        while not stop.is_set():
            k += 1
            body = {"model": MODEL, "input": f"worker {w} request {k}", "store": True,
                    "max_output_tokens": 6, "stream": w % 2 == 1}
            try:
                if not body["stream"]:
                    r = await c.post(url + "/v1/responses", json=body)
                    if r.status_code == 200:
                        done.append((r.json()["id"], r.json()["status"]))
                    continue
                rid, final = None, None
                async with c.stream("POST", url + "/v1/responses", json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data:") and '"response.created"' in line:
                            rid = line.split('"id": "', 1)[1].split('"', 1)[0]
                        if line.startswith("event: response.completed"):
                            final = "completed"
                        elif line.startswith("event: response.incomplete"):
                            final = "incomplete"
                        elif line.startswith("data:") and final and rid:
                            done.append((rid, final))  # the final event's data arrived
                            break
            except (httpx.TransportError, ValueError):
                failures += 1
                await asyncio.sleep(0.05)

    async with httpx.AsyncClient(timeout=httpx.Timeout(30, connect=5)) as c:
        await asyncio.gather(*(worker(c, w) for w in range(workers)))
    return failures


def test_kill_9_mid_traffic_loses_no_reported_response(tiny_ckpt: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    done: list[tuple[str, str]] = []
    t0 = time.monotonic()
    with ossrt_serve(tiny_ckpt, data) as (proc, url):
        async def run() -> int:
            stop = asyncio.Event()
            traffic = asyncio.create_task(_store_traffic(url, stop, done))
            deadline = time.monotonic() + 30
            while len(done) < 40 and time.monotonic() < deadline:  # mid-traffic, not at rest
                await asyncio.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)  # only the process this test started
            await asyncio.to_thread(proc.wait, 10)
            stop.set()
            return await asyncio.wait_for(traffic, 30)
        failures = asyncio.run(run())
        assert proc.returncode == -signal.SIGKILL
    assert len(done) >= 40, f"only {len(done)} responses completed before the kill"
    assert failures > 0, "the kill should have cut requests in flight"
    print(f"\n{len(done)} responses reported complete, {failures} requests cut by kill -9")

    with ossrt_serve(tiny_ckpt, data) as (_, url):
        with httpx.Client(base_url=url, timeout=10) as c:
            for rid, status in done:
                r = c.get(f"/v1/responses/{rid}")
                assert r.status_code == 200, (rid, r.text)
                assert r.json()["id"] == rid and r.json()["status"] == status
    assert integrity(data / DB_NAME) == "ok"
    assert time.monotonic() - t0 < 90


def _stream_lines(url: str, body: dict, sink: list[str]) -> BaseException | None:
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                sink.append(line)
    except httpx.HTTPError as exc:
        return exc
    return None


def test_sigterm_drains_streams_then_closes_engine_and_store(tiny_ckpt: Path,
                                                             tmp_path: Path) -> None:
    import threading

    data, log = tmp_path / "data", tmp_path / "serve.log"
    with ossrt_serve(tiny_ckpt, data, "--shutdown-timeout", "20", log=log) as (proc, url):
        r = httpx.post(url + "/v1/responses", json={"model": MODEL, "input": "x",
                                                     "max_output_tokens": 2}, timeout=30)
        assert r.status_code == 200  # the store now has a row (and a WAL file)
        lines: list[str] = []
        result: list[BaseException | None] = []
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 60, "stream": True, "temperature": 0}
        t = threading.Thread(target=lambda: result.append(_stream_lines(url, body, lines)))
        t.start()
        deadline = time.monotonic() + 20
        while not any(x.startswith("data:") for x in lines) and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        t.join(timeout=30)
        assert not t.is_alive()
        assert result == [None] and lines[-2:] == ["data: [DONE]", ""] or lines[-1:] == [
            "data: [DONE]"], lines[-3:]
        # uvicorn re-raises the SIGTERM it caught once it has shut down cleanly
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    text = log.read_text(errors="replace")
    assert "Application shutdown complete" in text
    assert not (data / (DB_NAME + "-wal")).exists()  # the store was closed (checkpointed)
    assert integrity(data / DB_NAME) == "ok"


def test_sigterm_cuts_streams_past_the_grace_period(tiny_ckpt: Path, tmp_path: Path) -> None:
    import threading

    data, log = tmp_path / "data", tmp_path / "serve.log"
    with ossrt_serve(tiny_ckpt, data, "--shutdown-timeout", "1", log=log) as (proc, url):
        lines: list[str] = []
        result: list[BaseException | None] = []
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 100000, "stream": True}
        t = threading.Thread(target=lambda: result.append(_stream_lines(url, body, lines)))
        t.start()
        deadline = time.monotonic() + 20
        while not any(x.startswith("data:") for x in lines) and time.monotonic() < deadline:
            time.sleep(0.01)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        t.join(timeout=20)
        assert not t.is_alive(), "the stream hung after SIGTERM"
        assert proc.wait(timeout=20) in (0, -signal.SIGTERM)
        assert time.monotonic() - t0 < 15
    assert "data: [DONE]" not in lines  # cut, not finished: the connection was closed
    assert "Application shutdown complete" in log.read_text(errors="replace")
    assert integrity(data / DB_NAME) == "ok"
