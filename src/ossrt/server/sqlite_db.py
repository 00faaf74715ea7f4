"""The embedded database pattern every store of the data dir shares.

One SQLite file in WAL mode (a `kill -9` at any moment leaves it consistent), one connection
shared across threads behind a lock, every write one `BEGIN IMMEDIATE` transaction. Handlers
call the blocking methods through `asyncio.to_thread`.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class SQLiteDB:
    """`SQLiteDB(folder, "name.sqlite3", schema)`: opens (creating) the file and its tables;
    folder None: an in-memory database (lost on exit: for tests and apps without a data dir)."""

    def __init__(self, data_dir: str | Path | None, db_name: str, schema: str) -> None:
        self.path: Path | None = None
        if data_dir is not None:
            Path(data_dir).mkdir(parents=True, exist_ok=True)
            self.path = Path(data_dir) / db_name
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path or ":memory:"), check_same_thread=False,
                                   isolation_level=None, timeout=30)
        with self._lock:
            if self.path is not None:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(schema)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed when the block ends, rolled back if it raises."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()
