"""The Files API: uploads kept in the data dir, for fine-tuning jobs (and batch, evals, ...).

Metadata lives in `data_dir/files.sqlite3` (WAL); contents in `data_dir/files/<file_id>`.
An upload is written to a temporary file in the same folder, flushed to disk, and only then
renamed into place and registered, so a crash at any point never leaves a half file behind a
registered id (an orphaned temporary file is removed at the next start).

Each method opens its own short-lived SQLite connection, so a `FileStore` holds nothing that
needs closing. Handlers call the blocking methods through `asyncio.to_thread`.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse

from .errors import APIError, invalid, not_found

DB_NAME = "files.sqlite3"
FOLDER = "files"
PURPOSES = ("fine-tune", "batch", "assistants", "user_data", "evals", "vision")
DEFAULT_MAX_FILE_BYTES = 512 << 20  # 512 MiB
NO_DATA_DIR = "This server has no data dir (start it with --data-dir) so it keeps no files."
_CHUNK = 1 << 20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL
)
"""


@dataclass(frozen=True, slots=True)
class FileRecord:
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str

    def to_api(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": self.bytes,
                "created_at": self.created_at, "filename": self.filename,
                "purpose": self.purpose, "status": "processed", "expires_at": None,
                "status_details": None}


class FileTooLarge(Exception):
    pass


class FileStore:
    def __init__(self, data_dir: str | Path, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> None:
        self.root = Path(data_dir)
        self.folder = self.root / FOLDER
        self.folder.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / DB_NAME
        self.max_bytes = int(max_bytes)
        with closing(self._connect()) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(_SCHEMA)
        for tmp in self.folder.glob(".upload-*"):  # a crash mid-upload left it: never registered
            tmp.unlink(missing_ok=True)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.db_path), isolation_level=None, timeout=30)
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    def path(self, file_id: str) -> Path:
        return self.folder / file_id

    def add(self, src: BinaryIO, filename: str, purpose: str) -> FileRecord:
        """Copies `src` in; raises FileTooLarge past `max_bytes` (nothing is kept then)."""
        file_id = "file-" + secrets.token_hex(12)
        tmp = self.folder / f".upload-{file_id}"
        size = 0
        try:
            with open(tmp, "wb") as out:
                while chunk := src.read(_CHUNK):
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise FileTooLarge
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path(file_id))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        rec = FileRecord(file_id, size, int(time.time()), filename, purpose)
        try:
            with closing(self._connect()) as db:
                db.execute("BEGIN IMMEDIATE")
                db.execute("INSERT INTO files VALUES (?, ?, ?, ?, ?)",
                           (rec.id, rec.bytes, rec.created_at, rec.filename, rec.purpose))
                db.execute("COMMIT")
        except BaseException:
            self.path(file_id).unlink(missing_ok=True)
            raise
        return rec

    def get(self, file_id: str) -> FileRecord | None:
        with closing(self._connect()) as db:
            row = db.execute("SELECT id, bytes, created_at, filename, purpose FROM files "
                             "WHERE id = ?", (file_id,)).fetchone()
        return FileRecord(*row) if row else None

    def list(self, purpose: str | None = None, limit: int = 10000, after: str | None = None,
             order: str = "desc") -> tuple[list[FileRecord], bool]:
        """A page of files (by creation, `order`), starting after the file `after`."""
        cmp, direction = ("<", "DESC") if order == "desc" else (">", "ASC")
        where, args = [], []
        if purpose:
            where.append("purpose = ?")
            args.append(purpose)
        with closing(self._connect()) as db:
            if after:
                row = db.execute("SELECT rowid FROM files WHERE id = ?", (after,)).fetchone()
                if row is None:
                    return [], False
                where.append(f"rowid {cmp} ?")
                args.append(row[0])
            sql = ("SELECT id, bytes, created_at, filename, purpose FROM files"
                   + (" WHERE " + " AND ".join(where) if where else "")
                   + f" ORDER BY rowid {direction} LIMIT ?")
            rows = db.execute(sql, (*args, limit + 1)).fetchall()
        return [FileRecord(*r) for r in rows[:limit]], len(rows) > limit

    def delete(self, file_id: str) -> bool:
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            gone = db.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount
            db.execute("COMMIT")
        self.path(file_id).unlink(missing_ok=True)
        return bool(gone)


# ---------------------------------------------------------------- routes

router = APIRouter()


def file_store(request: Request) -> FileStore:
    store = getattr(request.app.state, "files", None)
    if store is None:
        raise invalid(NO_DATA_DIR, code="no_data_dir")
    return store


def _missing(file_id: str) -> APIError:
    return not_found(f"No such File object: {file_id}", param="file_id", code="file_not_found")


@router.post("/v1/files")
async def upload_file(request: Request, file: UploadFile = File(...),
                      purpose: str = Form(...)) -> dict:
    store = file_store(request)
    if purpose not in PURPOSES:
        raise invalid(f"'{purpose}' is not one of {', '.join(map(repr, PURPOSES))} - "
                      "'purpose'", param="purpose")
    name = os.path.basename(file.filename or "") or "upload"
    try:
        rec = await asyncio.to_thread(store.add, file.file, name, purpose)
    except FileTooLarge:
        raise APIError(413, f"The file is larger than this server's limit of "
                       f"{store.max_bytes} bytes.", param="file",
                       code="file_too_large") from None
    finally:
        await file.close()
    return rec.to_api()


@router.get("/v1/files")
async def list_files(request: Request, purpose: str | None = None,
                     limit: int = Query(10000, ge=1, le=10000), after: str | None = None,
                     order: Literal["asc", "desc"] = "desc") -> dict:
    store = file_store(request)
    recs, more = await asyncio.to_thread(store.list, purpose, limit, after, order)
    return {"object": "list", "data": [r.to_api() for r in recs],
            "first_id": recs[0].id if recs else None, "last_id": recs[-1].id if recs else None,
            "has_more": more}


@router.get("/v1/files/{file_id}")
async def retrieve_file(file_id: str, request: Request) -> dict:
    rec = await asyncio.to_thread(file_store(request).get, file_id)
    if rec is None:
        raise _missing(file_id)
    return rec.to_api()


@router.get("/v1/files/{file_id}/content")
async def file_content(file_id: str, request: Request) -> FileResponse:
    store = file_store(request)
    rec = await asyncio.to_thread(store.get, file_id)
    if rec is None or not store.path(file_id).is_file():
        raise _missing(file_id)
    return FileResponse(store.path(file_id), media_type="application/octet-stream",
                        filename=rec.filename)


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, request: Request) -> dict:
    if not await asyncio.to_thread(file_store(request).delete, file_id):
        raise _missing(file_id)
    return {"id": file_id, "object": "file", "deleted": True}
