"""The Batch API: `/v1/batches`, a JSONL file of requests run in the background.

- `BatchStore`: `data_dir/batches.sqlite3` (WAL): the batches (their API objects, owner key id
  and tier, estimated tokens) and one row per finished line in `results`, keyed
  (batch_id, custom_id), written as each line completes.
- Creation validates the input file (a file of purpose "batch": one JSON object per line with
  `custom_id`, `method` "POST", `url` == the batch's endpoint, a JSON-object `body` naming a
  served model; unique custom_ids). A bad file does not get a 400: the batch is created with
  status "failed" and `errors.data` naming the lines (OpenAI's behaviour). Then the batch
  queue limit of the creating key's tier (`batch_queue_limit`: the most tokens that key may
  have enqueued across its unfinished batches, estimated with `estimate_cost` like the
  gateway's token limits) is checked and the batch enqueued, in one transaction.
- `BatchRunner`: one asyncio task on the app's loop (started and stopped by the lifespan) runs
  the in_progress batches oldest first, `concurrency` lines at a time, each by calling the
  app's own route in-process (`httpx.ASGITransport`). Those calls carry the per-process
  `state.internal_secret` in `x-ossrt-internal`: the gateway then skips the API key and the
  rate limits and books the request to the batch's owner (key id and tier) for metrics.
- At the end the results are written to an output file (2xx responses, purpose
  "batch_output") and an error file (the rest) through the FileStore, in input order.
- Cancel: cancelling -> cancelled once the lines in flight end (finished lines are kept).
  Expiry (24h after creation): the lines not run go to the error file as `batch_expired`.
- Restarts: a batch a dead server left in_progress resumes, skipping the custom_ids already in
  `results` (never run twice, never lost); lines that were in flight run again. A batch left
  validating is validated again; finalizing / cancelling ones are finished.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import secrets
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict

from .auth import INTERNAL_HEADER, OWNER_KEY_HEADER, OWNER_TIER_HEADER
from .errors import APIError, invalid, not_found
from .files import NO_DATA_DIR, FileStore
from .metrics import current_request
from .ratelimit import estimate_cost
from .sqlite_db import SQLiteDB

if TYPE_CHECKING:
    from fastapi import FastAPI

    from .state import ServerState

log = logging.getLogger(__name__)

DB_NAME = "batches.sqlite3"
ENDPOINTS = ("/v1/chat/completions", "/v1/responses", "/v1/completions")
WINDOWS = {"24h": 24 * 3600}
UNFINISHED = ("validating", "in_progress", "finalizing", "cancelling")
RUNNABLE = ("in_progress", "finalizing", "cancelling")
MAX_LINES = 50_000  # OpenAI's per-batch limit
MAX_ERRORS = 20  # validation errors listed per batch
DEFAULT_CONCURRENCY = 4

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, status TEXT NOT NULL, key_id TEXT NOT NULL, tier TEXT NOT NULL,
    tokens INTEGER NOT NULL DEFAULT 0, batch TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS batches_owner ON batches (key_id, status);
CREATE TABLE IF NOT EXISTS results (
    batch_id TEXT NOT NULL, custom_id TEXT NOT NULL, line INTEGER NOT NULL,
    ok INTEGER NOT NULL, result TEXT NOT NULL, PRIMARY KEY (batch_id, custom_id));
"""


def _now() -> int:
    return int(time.time())


def _problem(code: str, message: str, line: int | None = None,
             param: str | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


# ---------------------------------------------------------------- store


class BatchStore(SQLiteDB):
    """Batches and their per-line results; thread-safe (one connection under a lock)."""

    def __init__(self, data_dir: str | Path) -> None:
        super().__init__(data_dir, DB_NAME, _SCHEMA)

    def create(self, batch: dict[str, Any], key_id: str, tier: str) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO batches (id, status, key_id, tier, batch) "
                       "VALUES (?, ?, ?, ?, ?)",
                       (batch["id"], batch["status"], key_id, tier, json.dumps(batch)))

    def get(self, batch_id: str) -> dict[str, Any] | None:
        rows = self._read("SELECT batch FROM batches WHERE id = ?", (batch_id,))
        return json.loads(rows[0][0]) if rows else None

    def owner(self, batch_id: str) -> tuple[str, str] | None:
        rows = self._read("SELECT key_id, tier FROM batches WHERE id = ?", (batch_id,))
        return (rows[0][0], rows[0][1]) if rows else None

    @staticmethod
    def _update(db: sqlite3.Connection, batch_id: str, only_from: tuple[str, ...] | None,
                fields: dict[str, Any], tokens: int | None = None) -> dict[str, Any] | None:
        row = db.execute("SELECT batch FROM batches WHERE id = ?", (batch_id,)).fetchone()
        if row is None:
            return None
        batch = json.loads(row[0])
        if only_from is not None and batch["status"] not in only_from:
            return None
        batch.update(fields)
        db.execute("UPDATE batches SET batch = ?, status = ?, tokens = COALESCE(?, tokens) "
                   "WHERE id = ?", (json.dumps(batch), batch["status"], tokens, batch_id))
        return batch

    def update(self, batch_id: str, only_from: tuple[str, ...] | None = None,
               **fields: Any) -> dict[str, Any] | None:
        """Sets `fields` (when the status is in `only_from`, if given); the new batch, or None
        when it does not exist or its status did not match."""
        with self._tx() as db:
            return self._update(db, batch_id, only_from, fields)

    def enqueue(self, batch_id: str, tokens: int, total: int,
                limit: int | None) -> tuple[dict[str, Any] | None, int]:
        """validating -> in_progress holding `tokens`, unless the owner's other unfinished
        batches hold so many that `limit` would be passed: then (None, tokens held)."""
        with self._tx() as db:
            key_id = db.execute("SELECT key_id FROM batches WHERE id = ?",
                                (batch_id,)).fetchone()[0]
            marks = ", ".join("?" * len(UNFINISHED))
            held = db.execute(f"SELECT COALESCE(SUM(tokens), 0) FROM batches WHERE key_id = ? "
                              f"AND id != ? AND status IN ({marks})",
                              (key_id, batch_id, *UNFINISHED)).fetchone()[0]
            status = db.execute("SELECT status FROM batches WHERE id = ?",
                                (batch_id,)).fetchone()[0]
            if status != "validating":  # cancelled meanwhile: leave it to the runner
                return self._update(db, batch_id, None, {}), int(held)
            if limit is not None and held + tokens > limit:
                return None, int(held)
            batch = self._update(db, batch_id, ("validating",),
                                 {"status": "in_progress", "in_progress_at": _now(),
                                  "request_counts": {"total": total, "completed": 0,
                                                     "failed": 0}}, tokens)
            return batch, int(held)

    def with_status(self, *statuses: str) -> list[dict[str, Any]]:
        marks = ", ".join("?" * len(statuses))
        rows = self._read(f"SELECT batch FROM batches WHERE status IN ({marks}) ORDER BY rowid",
                          statuses)
        return [json.loads(r[0]) for r in rows]

    def list(self, key_id: str | None, limit: int = 20,
             after: str | None = None) -> tuple[list[dict[str, Any]], bool]:
        """Newest first; only `key_id`'s batches unless it is None."""
        where, args = ["1"], []
        if key_id is not None:
            where.append("key_id = ?")
            args.append(key_id)
        if after is not None:
            rows = self._read("SELECT rowid FROM batches WHERE id = ?", (after,))
            if not rows:
                return [], False
            where.append("rowid < ?")
            args.append(rows[0][0])
        rows = self._read(f"SELECT batch FROM batches WHERE {' AND '.join(where)} "
                          "ORDER BY rowid DESC LIMIT ?", (*args, limit + 1))
        return [json.loads(r[0]) for r in rows[:limit]], len(rows) > limit

    def add_result(self, batch_id: str, custom_id: str, line: int, ok: bool,
                   result: dict[str, Any]) -> bool:
        """Stores one line's result and counts it on the batch; False if it was already in."""
        with self._tx() as db:
            cur = db.execute("INSERT OR IGNORE INTO results VALUES (?, ?, ?, ?, ?)",
                             (batch_id, custom_id, line, int(ok), json.dumps(result)))
            if not cur.rowcount:
                return False
            row = db.execute("SELECT batch FROM batches WHERE id = ?", (batch_id,)).fetchone()
            batch = json.loads(row[0])
            counts = batch["request_counts"]
            counts["completed" if ok else "failed"] += 1
            db.execute("UPDATE batches SET batch = ? WHERE id = ?", (json.dumps(batch), batch_id))
        return True

    def done_ids(self, batch_id: str) -> set[str]:
        return {r[0] for r in self._read("SELECT custom_id FROM results WHERE batch_id = ?",
                                         (batch_id,))}

    def results(self, batch_id: str) -> list[tuple[bool, str]]:
        """(ok, result JSON) in input order."""
        return [(bool(ok), res) for ok, res in self._read(
            "SELECT ok, result FROM results WHERE batch_id = ? ORDER BY line", (batch_id,))]


# ---------------------------------------------------------------- validation


def parse_input(path: Path, endpoint: str, served: set[str],
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the requests, each with its 1-based `line`; the problems, at most MAX_ERRORS)."""
    items: list[dict[str, Any]] = []
    problems: list[dict[str, Any]] = []
    seen: set[str] = set()

    def bad(code: str, message: str, line: int | None, param: str | None = None) -> None:
        if len(problems) < MAX_ERRORS:
            problems.append(_problem(code, message, line, param))

    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue  # blank lines (a trailing newline) are allowed
            try:
                obj = json.loads(raw)
            except ValueError:
                bad("invalid_json_line", f"Line {n} is not valid JSON.", n)
                continue
            if not isinstance(obj, dict):
                bad("invalid_request", f"Line {n} is not a JSON object.", n)
                continue
            cid = obj.get("custom_id")
            if not isinstance(cid, str) or not cid:
                bad("missing_required_parameter",
                    f"Line {n}: custom_id must be a non-empty string.", n, "custom_id")
                continue
            if cid in seen:
                bad("duplicate_custom_id", f"Line {n}: the custom_id '{cid}' is used more than "
                    "once; custom_ids must be unique within a batch.", n, "custom_id")
                continue
            seen.add(cid)
            if obj.get("method") != "POST":
                bad("invalid_method", f"Line {n}: method must be 'POST', not "
                    f"{obj.get('method')!r}.", n, "method")
                continue
            if obj.get("url") != endpoint:
                bad("mismatched_endpoint", f"Line {n}: the url {obj.get('url')!r} does not "
                    f"match the batch's endpoint '{endpoint}'.", n, "url")
                continue
            body = obj.get("body")
            if not isinstance(body, dict):
                bad("invalid_request", f"Line {n}: body must be a JSON object.", n, "body")
                continue
            model = body.get("model")
            if not isinstance(model, str) or model not in served:
                bad("model_not_found", f"Line {n}: the model {model!r} does not exist or you "
                    "do not have access to it.", n, "body.model")
                continue
            items.append({"line": n, "custom_id": cid, "body": body})
            if len(items) > MAX_LINES:
                bad("too_many_requests", f"A batch holds at most {MAX_LINES} requests.", n)
                break
    if not items and not problems:
        bad("empty_file", "The input file holds no requests.", None, "input_file_id")
    return items, problems


# ---------------------------------------------------------------- runner


class BatchRunner:
    """Validates and runs batches on the app's event loop (see the module docstring)."""

    def __init__(self, state: ServerState, app: FastAPI, files: FileStore, *,
                 concurrency: int = DEFAULT_CONCURRENCY) -> None:
        assert state.data_dir
        self.state, self.app, self.files = state, app, files
        self.store = BatchStore(state.data_dir)
        self.concurrency = max(1, int(concurrency))
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._cancelled: set[str] = set()

    # -- lifecycle (the lifespan calls these on the app's loop)

    async def astart(self) -> None:
        if self._task is not None:
            return
        self._wake = asyncio.Event()
        for batch in self.store.with_status("validating"):
            await self.validate(batch["id"])
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="ossrt-batches")

    async def aclose(self) -> None:
        """Stops the runner: lines in flight are dropped (they run again at the next start);
        batches stay in_progress, to resume then."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - stopping regardless
                pass
            self._task = None
        self.store.close()

    def kick(self) -> None:
        if self._wake is not None:
            self._wake.set()

    # -- creation

    def count_tokens(self, text: str) -> int:
        return len(self.state.tokenizer.encode(text, allow_special=False))

    async def validate(self, batch_id: str) -> dict[str, Any]:
        """validating -> in_progress, or failed (bad input or over the queue limit)."""
        batch = self.store.get(batch_id)
        assert batch is not None
        if batch["status"] != "validating":
            return batch
        key_id, tier = self.store.owner(batch_id) or ("anonymous", "default")
        served = {m.id for m in self.state.models}
        endpoint = batch["endpoint"]
        try:
            items, problems = await asyncio.to_thread(
                parse_input, self.files.path(batch["input_file_id"]), endpoint, served)
        except OSError as exc:
            items, problems = [], [_problem("file_unreadable", f"Cannot read the input file: "
                                            f"{exc.strerror or exc}", None, "input_file_id")]
        if problems:
            return self._fail(batch_id, problems)
        tokens = await asyncio.to_thread(
            lambda: sum(estimate_cost(endpoint, it["body"], self.count_tokens) for it in items))
        limits = self.state.rate_limits
        spec = limits.tier(tier) if limits is not None else None
        limit = spec.batch_queue_limit if spec is not None else None
        enqueued, held = await asyncio.to_thread(self.store.enqueue, batch_id, tokens,
                                                 len(items), limit)
        if enqueued is None:
            return self._fail(batch_id, [_problem(
                "token_limit_exceeded",
                f"Enqueued token limit reached for tier {tier}. Limit: {limit} enqueued tokens; "
                f"this key's unfinished batches hold {held} and this batch needs an estimated "
                f"{tokens} (prompt estimate + max output tokens). Submit a batch with fewer "
                "tokens or wait for your in-progress batches to complete.")])
        self.kick()
        return enqueued

    def _fail(self, batch_id: str, problems: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.store.update(batch_id, ("validating",), status="failed", failed_at=_now(),
                                  errors={"object": "list", "data": problems})
        return batch or self.store.get(batch_id)  # type: ignore[return-value]

    def cancel(self, batch_id: str) -> dict[str, Any] | None:
        """-> cancelling (the runner ends it); a finished batch is returned unchanged."""
        batch = self.store.update(batch_id, ("validating", "in_progress"), status="cancelling",
                                  cancelling_at=_now())
        if batch is None:
            return self.store.get(batch_id)
        self._cancelled.add(batch_id)
        self.kick()
        return batch

    # -- running

    async def _loop(self) -> None:
        assert self._wake is not None
        while True:
            self._wake.clear()
            pending = await asyncio.to_thread(self.store.with_status, *RUNNABLE)
            if not pending:
                await self._wake.wait()
                continue
            batch = pending[0]
            try:
                await self._run(batch["id"])
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - one broken batch must not stop the others
                log.exception("batch %s failed", batch["id"])
                self.store.update(batch["id"], status="failed", failed_at=_now(),
                                  errors={"object": "list", "data": [_problem(
                                      "server_error", "The server failed to run this batch.")]})

    def _stopping(self, batch_id: str, expires_at: int) -> bool:
        return batch_id in self._cancelled or _now() >= expires_at

    async def _run(self, batch_id: str) -> None:
        batch = self.store.get(batch_id)
        assert batch is not None
        if batch["status"] == "in_progress" and not self._stopping(batch_id,
                                                                    batch["expires_at"]):
            items = await self._items(batch)
            done = await asyncio.to_thread(self.store.done_ids, batch_id)
            todo = iter([it for it in items if it["custom_id"] not in done])
            key_id, tier = self.store.owner(batch_id) or ("anonymous", "default")
            headers = {INTERNAL_HEADER: self.state.internal_secret,
                       OWNER_KEY_HEADER: key_id, OWNER_TIER_HEADER: tier}
            transport = httpx.ASGITransport(app=self.app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://ossrt.internal",
                                         timeout=None) as client:

                async def worker() -> None:
                    for item in todo:  # one shared iterator: each line is taken once
                        if self._stopping(batch_id, batch["expires_at"]):
                            return
                        ok, result = await self._line(client, batch["endpoint"], item, headers)
                        await asyncio.to_thread(self.store.add_result, batch_id,
                                                item["custom_id"], item["line"], ok, result)

                await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        await self._finish(batch_id)

    async def _items(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """The batch's requests. Models it was validated with may since have gone (a restart
        with other models): their lines still run, and get the route's 404."""
        served = {m.id for m in self.state.models} | set(batch.get("_models") or ())
        items, _ = await asyncio.to_thread(parse_input, self.files.path(batch["input_file_id"]),
                                           batch["endpoint"], served)
        return items

    async def _line(self, client: httpx.AsyncClient, endpoint: str, item: dict[str, Any],
                    headers: dict[str, str]) -> tuple[bool, dict[str, Any]]:
        result: dict[str, Any] = {"id": "batch_req_" + secrets.token_hex(12),
                                  "custom_id": item["custom_id"], "response": None,
                                  "error": None}
        body = item["body"]
        if body.get("stream"):
            result["error"] = {"code": "streaming_unsupported", "message": (
                f"Line {item['line']}: streaming ('stream': true) is not supported in a batch.")}
            return False, result
        rid = "req_" + secrets.token_hex(16)
        try:
            r = await client.post(endpoint, json=body, headers={**headers, "x-request-id": rid})
        except Exception as exc:  # noqa: BLE001 - the line fails, the batch goes on
            log.exception("batch line %s failed", item["custom_id"])
            result["error"] = {"code": "server_error", "message": f"The request failed: {exc}"}
            return False, result
        try:
            payload: Any = r.json()
        except ValueError:
            payload = r.text
        result["response"] = {"status_code": r.status_code,
                              "request_id": r.headers.get("x-request-id", rid), "body": payload}
        return 200 <= r.status_code < 300, result

    async def _finish(self, batch_id: str) -> None:
        """Writes the output and error files and ends the batch (completed, cancelled or
        expired)."""
        batch = self.store.get(batch_id)
        assert batch is not None
        cancelled = batch["status"] == "cancelling" or batch_id in self._cancelled
        results = await asyncio.to_thread(self.store.results, batch_id)
        not_run: list[dict[str, Any]] = []
        if batch["status"] == "in_progress" and not cancelled and _now() >= batch["expires_at"]:
            done = {json.loads(r)["custom_id"] for _, r in results}
            not_run = [it for it in await self._items(batch) if it["custom_id"] not in done]
        expired = bool(not_run)  # every line ran: completed, however late
        if batch["status"] == "in_progress" and not expired and not cancelled:
            self.store.update(batch_id, ("in_progress",), status="finalizing",
                              finalizing_at=_now())
        out = [res for ok, res in results if ok]
        err = [res for ok, res in results if not ok]
        if expired:  # the lines not run are in the error file
            err += [json.dumps({
                "id": "batch_req_" + secrets.token_hex(12), "custom_id": it["custom_id"],
                "response": None, "error": {"code": "batch_expired", "message": (
                    "This request could not be executed before the completion window "
                    "expired.")}}) for it in not_run]
        out_id = await self._write(batch_id, "output", out)
        err_id = await self._write(batch_id, "error", err)
        now = _now()
        fields: dict[str, Any] = {"output_file_id": out_id, "error_file_id": err_id}
        if expired:
            fields.update(status="expired", expired_at=now)
        elif cancelled:
            fields.update(status="cancelled", cancelled_at=now)
        else:
            fields.update(status="completed", completed_at=now)
        self.store.update(batch_id, RUNNABLE, **fields)
        self._cancelled.discard(batch_id)

    async def _write(self, batch_id: str, kind: str, lines: list[str]) -> str | None:
        if not lines:
            return None
        data = ("\n".join(lines) + "\n").encode()
        rec = await asyncio.to_thread(self.files.add, io.BytesIO(data),
                                      f"{batch_id}_{kind}.jsonl", "batch_output")
        return rec.id


# ---------------------------------------------------------------- routes

router = APIRouter()


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None
    output_expires_after: dict[str, Any] | None = None  # accepted, not acted on


def _runner(request: Request) -> BatchRunner:
    runner = getattr(request.app.state.ossrt, "batches", None)
    if runner is None:
        raise invalid(NO_DATA_DIR, code="no_data_dir")
    return runner


def _caller(request: Request) -> tuple[str, str, bool]:
    """(key id, tier, whether auth is on) of the caller, as the gateway saw it."""
    state: ServerState = request.app.state.ossrt
    rec = current_request.get()
    key_id = (rec.key_id if rec is not None and rec.key_id else None) or "anonymous"
    tier = rec.tier if rec is not None and rec.tier != "none" else "default"
    return key_id, tier, state.auth is not None and state.auth.enabled()


def _missing(batch_id: str) -> APIError:
    return not_found(f"No batch found with id '{batch_id}'.", param="batch_id",
                     code="batch_not_found")


def _public(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if not k.startswith("_")}


async def _own(request: Request, batch_id: str) -> tuple[BatchRunner, dict[str, Any]]:
    runner = _runner(request)
    key_id, _, auth_on = _caller(request)
    batch = await asyncio.to_thread(runner.store.get, batch_id)
    owner = await asyncio.to_thread(runner.store.owner, batch_id)
    if batch is None or owner is None or (auth_on and owner[0] != key_id):
        raise _missing(batch_id)
    return runner, batch


@router.post("/v1/batches")
async def create_batch(body: BatchRequest, request: Request) -> dict:
    runner = _runner(request)
    if body.endpoint not in ENDPOINTS:
        raise invalid(f"Invalid value for 'endpoint': '{body.endpoint}'; this server batches "
                      f"{', '.join(ENDPOINTS)}.", param="endpoint")
    if body.completion_window not in WINDOWS:
        raise invalid(f"Invalid value for 'completion_window': '{body.completion_window}'; "
                      "only '24h' is supported.", param="completion_window")
    if body.metadata is not None and (len(body.metadata) > 16 or any(
            len(k) > 64 or len(v) > 512 for k, v in body.metadata.items())):
        raise invalid("metadata holds at most 16 pairs, keys up to 64 and values up to 512 "
                      "characters.", param="metadata")
    rec = await asyncio.to_thread(runner.files.get, body.input_file_id)
    if rec is None or not runner.files.path(body.input_file_id).is_file():
        raise invalid(f"No such File object: {body.input_file_id}", param="input_file_id",
                      code="invalid_input_file")
    if rec.purpose != "batch":
        raise invalid(f"File {body.input_file_id} has purpose '{rec.purpose}'; a batch's input "
                      "file needs purpose 'batch'.", param="input_file_id",
                      code="invalid_input_file")
    key_id, tier, _ = _caller(request)
    now = _now()
    batch: dict[str, Any] = {
        "id": "batch_" + secrets.token_hex(12), "object": "batch", "endpoint": body.endpoint,
        "errors": None, "input_file_id": body.input_file_id,
        "completion_window": body.completion_window, "status": "validating",
        "output_file_id": None, "error_file_id": None, "created_at": now,
        "in_progress_at": None, "expires_at": now + WINDOWS[body.completion_window],
        "finalizing_at": None, "completed_at": None, "failed_at": None, "expired_at": None,
        "cancelling_at": None, "cancelled_at": None,
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "metadata": body.metadata,
        "_models": sorted({m.id for m in request.app.state.ossrt.models})}
    await asyncio.to_thread(runner.store.create, batch, key_id, tier)
    return _public(await runner.validate(batch["id"]))


@router.get("/v1/batches")
async def list_batches(request: Request, limit: int = Query(20, ge=1, le=100),
                       after: str | None = None) -> dict:
    runner = _runner(request)
    key_id, _, auth_on = _caller(request)
    batches, more = await asyncio.to_thread(runner.store.list, key_id if auth_on else None,
                                            limit, after)
    data = [_public(b) for b in batches]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": more}


@router.get("/v1/batches/{batch_id}")
async def retrieve_batch(batch_id: str, request: Request) -> dict:
    _, batch = await _own(request, batch_id)
    return _public(batch)


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, request: Request) -> dict:
    runner, _ = await _own(request, batch_id)
    batch = runner.cancel(batch_id)  # on the loop: it wakes the runner
    if batch is None:
        raise _missing(batch_id)
    return _public(batch)
