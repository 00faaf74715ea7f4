"""The Files API through the official client: upload, list, retrieve, content, delete, purpose
and size errors (the upload limit is apart from the body limit), 404s in OpenAI's shape, and
files that survive a restart on the same data dir."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import openai
import pytest
from test_server_chat import ScriptedEngine

from ossrt.harmony.tokenizer import get_tokenizer
from ossrt.server.app import create_app
from ossrt.server.files import DB_NAME
from ossrt.server.state import ModelCard, ServerState

DATA = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'


def _app(data_dir: Path | None, **limits: int):  # noqa: ANN202 - a FastAPI app
    state = ServerState(engine=ScriptedEngine(), tokenizer=get_tokenizer(),
                        models=[ModelCard(id="m")], data_dir=str(data_dir) if data_dir else None)
    return create_app(state, **limits)


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)


def test_upload_list_retrieve_content_delete_and_restart(live_server, tmp_path: Path) -> None:
    with live_server(_app(tmp_path)) as url:
        client = _client(url)
        f = client.files.create(file=("train.jsonl", DATA), purpose="fine-tune")
        assert f.id.startswith("file-") and f.object == "file" and f.bytes == len(DATA)
        assert f.filename == "train.jsonl" and f.purpose == "fine-tune"
        assert f.status == "processed" and f.expires_at is None and f.created_at > 0
        b = client.files.create(file=("batch.jsonl", io.BytesIO(b"{}\n")), purpose="batch")
        assert client.files.retrieve(f.id).model_dump() == f.model_dump()
        assert client.files.content(f.id).content == DATA
        ids = [x.id for x in client.files.list()]
        assert ids == [b.id, f.id]  # newest first
        assert [x.id for x in client.files.list(purpose="fine-tune")] == [f.id]
        raw = httpx.get(url + "/v1/files", params={"order": "asc", "limit": 1}).json()
        assert [x["id"] for x in raw["data"]] == [f.id] and raw["has_more"] is True
        raw = httpx.get(url + "/v1/files", params={"order": "asc", "after": f.id}).json()
        assert [x["id"] for x in raw["data"]] == [b.id] and raw["has_more"] is False
        gone = client.files.delete(b.id)
        assert gone.id == b.id and gone.deleted is True and gone.object == "file"
        assert not (tmp_path / "files" / b.id).exists()
        with pytest.raises(openai.NotFoundError) as err:
            client.files.retrieve(b.id)
        assert err.value.body["code"] == "file_not_found" and err.value.body["param"] == "file_id"
        r = httpx.get(url + f"/v1/files/{b.id}/content")
        assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param",
                                                                   "code"}
        with pytest.raises(openai.NotFoundError):
            client.files.delete(b.id)
    assert (tmp_path / DB_NAME).is_file()
    with live_server(_app(tmp_path)) as url:  # a new server on the same data dir
        client = _client(url)
        assert [x.id for x in client.files.list()] == [f.id]
        assert client.files.content(f.id).content == DATA


def test_bad_purpose_and_missing_file(live_server, tmp_path: Path) -> None:
    with live_server(_app(tmp_path)) as url:
        client = _client(url)
        with pytest.raises(openai.BadRequestError) as err:
            client.files.create(file=("x.jsonl", DATA), purpose="homework")  # type: ignore[arg-type]
        assert err.value.body["param"] == "purpose"
        r = httpx.post(url + "/v1/files", data={"purpose": "fine-tune"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "file"


def test_size_limits(live_server, tmp_path: Path) -> None:
    """Uploads have their own limit, above the app's body limit for everything else."""
    with live_server(_app(tmp_path, max_body_bytes=1000, max_file_bytes=50_000)) as url:
        client = _client(url)
        ok = client.files.create(file=("big.jsonl", b"x" * 20_000), purpose="batch")
        assert ok.bytes == 20_000  # larger than any other request may be
        with pytest.raises(openai.APIStatusError) as err:
            client.files.create(file=("bigger.jsonl", b"x" * 60_000), purpose="batch")
        assert err.value.status_code == 413 and err.value.body["code"] == "file_too_large"
        with pytest.raises(openai.APIStatusError) as err:  # refused from its Content-Length
            client.files.create(file=("huge.jsonl", b"x" * (2 << 20)), purpose="batch")
        assert err.value.status_code == 413 and err.value.body["code"] == "request_too_large"
        r = httpx.post(url + "/v1/chat/completions", json={"model": "m", "messages": [
            {"role": "user", "content": "y" * 2000}]})
        assert r.status_code == 413  # the general limit still holds
        assert [x.id for x in client.files.list()] == [ok.id]
        assert sorted(p.name for p in (tmp_path / "files").iterdir()) == [ok.id]


def test_no_data_dir(live_server) -> None:
    with live_server(_app(None)) as url:
        client = _client(url)
        with pytest.raises(openai.BadRequestError) as err:
            client.files.list()
        assert "no data dir" in err.value.message
        with pytest.raises(openai.BadRequestError):
            client.fine_tuning.jobs.list()
