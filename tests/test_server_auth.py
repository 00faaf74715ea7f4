"""API keys: refused on every route but /health when missing, wrong or revoked; accepted when
good; stored hashed; managed with `ossrt keys create|list|revoke`; auth off without keys."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
from test_server_chat import ScriptedEngine, harmony

from ossrt.cli import main
from ossrt.harmony.tokenizer import RETURN, get_tokenizer
from ossrt.server.app import create_app
from ossrt.server.auth import Authenticator, configure
from ossrt.server.keys import FILENAME, KeyStore
from ossrt.server.state import ModelCard, ServerState

MODEL = "scripted"
STATIC = "static-test-key-0123456789"
ANSWER = "<|channel|>final<|message|>Hello!"
ROUTES = [("GET", "/v1/models", None),
          ("POST", "/v1/chat/completions",
           {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
          ("POST", "/v1/completions", {"model": MODEL, "prompt": "hi"}),
          ("POST", "/v1/responses", {"model": MODEL, "input": "hi"}),
          ("GET", "/v1/responses/resp_123", None),
          ("GET", "/metrics", None),
          ("POST", "/v1/embeddings", {"model": MODEL, "input": "hi"}),
          ("GET", "/no/such/path", None)]


def _keys(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(["keys", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def secured(live_server, tmp_path_factory):
    data = tmp_path_factory.mktemp("keys")
    store = KeyStore(data)
    engine = ScriptedEngine()
    state = ServerState(engine=engine, tokenizer=get_tokenizer(), models=[ModelCard(id=MODEL)],
                        auth=Authenticator({STATIC: "default"}, store))
    with live_server(create_app(state)) as url:
        yield url, store, engine


def _assert_401(r: httpx.Response) -> None:
    assert r.status_code == 401, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"].startswith("Incorrect API key provided")
    assert (err["type"], err["param"], err["code"]) == (
        "invalid_request_error", None, "invalid_api_key")
    assert r.headers["x-request-id"]


def test_health_needs_no_key(secured) -> None:
    url, _, _ = secured
    assert httpx.get(url + "/health").json() == {"status": "ok"}


def test_missing_wrong_and_revoked_keys_refused_everywhere(secured) -> None:
    url, store, engine = secured
    rec, revoked = store.create("default")
    assert store.revoke(rec.id) is not None
    bad_headers = [{}, {"Authorization": "Bearer sk-wrong-key-123456"},
                   {"Authorization": f"Basic {STATIC}"}, {"Authorization": f"Bearer {revoked}"}]
    with httpx.Client(base_url=url) as http:
        for method, path, body in ROUTES:
            for headers in bad_headers:
                _assert_401(http.request(method, path, json=body, headers=headers))
    assert engine.prompts == []  # nothing reached the model


def test_good_keys_work_through_the_client(secured) -> None:
    url, store, engine = secured
    _, key = store.create("tier-2")
    for api_key in (key, STATIC):
        engine.scripts.append(harmony(ANSWER, RETURN))
        client = openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0)
        r = client.chat.completions.create(model=MODEL,
                                           messages=[{"role": "user", "content": "hi"}])
        assert r.choices[0].message.content == "Hello!"
        assert [m.id for m in client.models.list()] == [MODEL]
    assert httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {key}"}
                     ).status_code == 200
    bad = openai.OpenAI(base_url=url + "/v1", api_key="sk-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as exc:
        bad.models.list()
    assert exc.value.code == "invalid_api_key"


def test_keys_cli_and_live_revocation(secured, capsys) -> None:
    url, store, engine = secured
    data = str(store.path.parent)
    rc, out, err = _keys("create", "--tier", "tier-3", "--data-dir", data, capsys=capsys)
    assert rc == 0 and "shown only once" in err
    key = out.strip()
    assert key.startswith("sk-") and len(key) > 40
    rc, out, _ = _keys("list", "--data-dir", data, capsys=capsys)
    listed = [json.loads(line) for line in out.splitlines()]
    mine = [k for k in listed if k["hint"] == f"sk-...{key[-4:]}"]
    assert len(mine) == 1 and mine[0]["tier"] == "tier-3" and mine[0]["revoked_at"] is None
    assert key not in out

    engine.scripts.append(harmony(ANSWER, RETURN))
    client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])

    rc, _, err = _keys("revoke", mine[0]["id"], "--data-dir", data, capsys=capsys)
    assert rc == 0 and "revoked" in err
    with pytest.raises(openai.AuthenticationError):  # the running server sees it at once
        client.models.list()
    rc, _, err = _keys("revoke", mine[0]["id"], "--data-dir", data, capsys=capsys)
    assert rc == 2 and "no live key" in err
    rc, out, _ = _keys("list", "--data-dir", data, capsys=capsys)
    assert mine[0]["id"] not in out
    rc, out, _ = _keys("list", "--all", "--data-dir", data, capsys=capsys)
    assert [json.loads(x) for x in out.splitlines() if mine[0]["id"] in x][0]["revoked_at"]


def test_keys_not_recoverable_from_the_db(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    keys = [store.create(t)[1] for t in ("default", "tier-1", "tier-1")]
    store.revoke(keys[1])  # by the key itself
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith(FILENAME))
    assert raw
    for key in keys:
        assert key.encode() not in raw and key[3:].encode() not in raw
        assert key[3:20].encode() not in raw
    assert store.lookup(keys[0]).tier == "default" and store.lookup(keys[1]) is None
    assert store.lookup(keys[2]).tier == "tier-1" and store.lookup("sk-" + "x" * 43) is None
    assert (tmp_path / (FILENAME + "-wal")).exists() or store.num_active() == 2


def test_auth_off_without_keys(live_server, tmp_path: Path) -> None:
    engine = ScriptedEngine()
    engine.scripts.append(harmony(ANSWER, RETURN))
    state = ServerState(engine=engine, tokenizer=get_tokenizer(), models=[ModelCard(id=MODEL)],
                        auth=Authenticator(None, KeyStore(tmp_path)))
    with live_server(create_app(state)) as url:
        r = httpx.post(url + "/v1/chat/completions",
                       json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
        assert httpx.get(url + "/metrics").status_code == 200


def test_serve_refuses_public_bind_without_keys(tmp_path: Path) -> None:
    _, _, banner = configure(api_key=None, rate_limits=None, data_dir=tmp_path,
                             host="127.0.0.1")
    assert "auth OFF" in banner
    with pytest.raises(ValueError, match="--allow-unauthenticated"):
        configure(api_key=None, rate_limits=None, data_dir=tmp_path, host="0.0.0.0")
    _, _, banner = configure(api_key=None, rate_limits=None, data_dir=tmp_path, host="0.0.0.0",
                             allow_unauthenticated=True)
    assert "auth OFF" in banner
    auth, _, banner = configure(api_key="k" * 20, rate_limits=None, data_dir=tmp_path,
                                host="0.0.0.0")
    assert "auth ON" in banner and auth.enabled()
    KeyStore(tmp_path).create()
    _, _, banner = configure(api_key=None, rate_limits=None, data_dir=tmp_path, host="10.1.2.3")
    assert "auth ON" in banner and "1 key(s)" in banner
    # and through the CLI, before any model is loaded
    empty = tmp_path / "empty"
    assert main(["serve", "--host", "0.0.0.0", "--data-dir", str(empty),
                 "--model", str(tmp_path / "no-model")]) == 2
