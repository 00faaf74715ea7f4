"""Stored Responses API objects: one SQLite table in the data dir, surviving restarts.

Each row holds a finished response (its JSON), the input items of that request (normalized,
with ids), and its `previous_response_id`, so a `previous_response_id` chain can be replayed.
The connection is shared across threads behind a lock; every write is one transaction.
Handlers call the blocking methods through `asyncio.to_thread`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .sqlite_db import SQLiteDB

DB_NAME = "responses.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    model TEXT NOT NULL,
    response TEXT NOT NULL,
    input_items TEXT NOT NULL,
    previous_response_id TEXT
)
"""


@dataclass(frozen=True, slots=True)
class StoredResponse:
    id: str
    response: dict[str, Any]
    input_items: list[dict[str, Any]]
    previous_response_id: str | None


class ResponseStore(SQLiteDB):
    """`ResponseStore(folder)` keeps `folder/responses.sqlite3`; `ResponseStore(None)` is an
    in-memory store (lost on exit: for tests and apps built without a data dir)."""

    def __init__(self, folder: str | Path | None) -> None:
        super().__init__(folder, DB_NAME, _SCHEMA)

    def put(self, response: dict[str, Any], input_items: list[dict[str, Any]],
            transcript: dict[str, dict[str, str]] | None = None,
            conversation: str | None = None) -> None:
        """`transcript`: for each built-in tool call item id, what the model wrote and read
        (recipient, channel, arguments, output), kept so a chain replays it exactly;
        `conversation`: the id its chain's tool state lives under. Both are stored under
        private keys (`_tool_transcript`, `_conversation`) that the API never shows."""
        stored = dict(response)
        if transcript:
            stored["_tool_transcript"] = transcript
        if conversation and conversation != response["id"]:
            stored["_conversation"] = conversation
        row = (response["id"], float(response["created_at"]), str(response["model"]),
               json.dumps(stored), json.dumps(input_items),
               response.get("previous_response_id"))
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?)", row)

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, response, input_items, previous_response_id FROM responses "
                "WHERE id = ?", (response_id,)).fetchone()
        if row is None:
            return None
        return StoredResponse(row[0], json.loads(row[1]), json.loads(row[2]), row[3])

    def conversation_of(self, response_id: str) -> str:
        """The id a chain's tool state lives under: its first response's id."""
        stored = self.get(response_id)
        if stored is None:
            return response_id
        return stored.response.get("_conversation") or response_id

    def delete(self, response_id: str) -> bool:
        with self._lock:
            cur = self._db.execute("DELETE FROM responses WHERE id = ?", (response_id,))
        return cur.rowcount > 0

    def chain(self, response_id: str) -> list[dict[str, Any]] | None:
        """Every item of the conversation up to and including `response_id` (oldest first:
        each response's input items, then its output), or None if any link is missing."""
        links: list[StoredResponse] = []
        seen: set[str] = set()
        current: str | None = response_id
        while current is not None:
            if current in seen:  # a cycle cannot be written through the API; refuse anyway
                return None
            seen.add(current)
            stored = self.get(current)
            if stored is None:
                return None
            links.append(stored)
            current = stored.previous_response_id
        items: list[dict[str, Any]] = []
        for link in reversed(links):
            items += link.input_items
            seen = link.response.get("_tool_transcript") or {}
            items += [{**item, "_harmony": seen[item.get("id")]} if item.get("id") in seen
                      else item for item in link.response.get("output") or []]
        return items
