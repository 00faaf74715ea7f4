"""API keys in SQLite: only a keyed hash of each key is stored, never the key itself.

A key is `sk-` + 32 random bytes (url-safe base64), so a keyed SHA-256 (HMAC with a random
per-database salt) is enough: there is nothing to brute-force. The file is `keys.sqlite3` in the
data dir, in WAL mode; each call opens its own short connection, so a key revoked with
`ossrt keys revoke` while the server runs is refused on the server's next request.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

FILENAME = "keys.sqlite3"
KEY_PREFIX = "sk-"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    hash BLOB NOT NULL UNIQUE,
    hint TEXT NOT NULL,
    tier TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);
"""


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    tier: str
    hint: str  # e.g. "sk-...a1b2": enough to tell keys apart, not to use one
    created_at: int
    revoked_at: int | None = None

    def to_dict(self) -> dict[str, object]:
        return {"id": self.id, "tier": self.tier, "hint": self.hint,
                "created_at": self.created_at, "revoked_at": self.revoked_at}


class KeyStore:
    def __init__(self, data_dir: str | Path) -> None:
        self.path = Path(data_dir) / FILENAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
            db.execute("INSERT OR IGNORE INTO meta (name, value) VALUES ('salt', ?)",
                       (secrets.token_bytes(32),))
            self._salt: bytes = db.execute(
                "SELECT value FROM meta WHERE name = 'salt'").fetchone()[0]

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        try:
            yield db
        finally:
            db.close()

    def _hash(self, key: str) -> bytes:
        return hmac.new(self._salt, key.encode(), hashlib.sha256).digest()

    def create(self, tier: str = "default") -> tuple[KeyRecord, str]:
        """A new key: (its record, the key). The key is shown this once and never stored."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        rec = KeyRecord(id="key_" + secrets.token_hex(8), tier=tier,
                        hint=f"{KEY_PREFIX}...{key[-4:]}", created_at=int(time.time()))
        with self._db() as db:
            db.execute("INSERT INTO keys (id, hash, hint, tier, created_at) VALUES (?,?,?,?,?)",
                       (rec.id, self._hash(key), rec.hint, rec.tier, rec.created_at))
        return rec, key

    def list(self, include_revoked: bool = True) -> list[KeyRecord]:
        sql = "SELECT id, tier, hint, created_at, revoked_at FROM keys"
        if not include_revoked:
            sql += " WHERE revoked_at IS NULL"
        with self._db() as db:
            return [KeyRecord(*row) for row in db.execute(sql + " ORDER BY created_at, id")]

    def revoke(self, id_or_key: str) -> KeyRecord | None:
        """Revokes by key id (or by the key itself); None if no such live key."""
        with self._db() as db:
            row = db.execute("SELECT id FROM keys WHERE (id = ? OR hash = ?) "
                             "AND revoked_at IS NULL", (id_or_key, self._hash(id_or_key))
                             ).fetchone()
            if row is None:
                return None
            db.execute("UPDATE keys SET revoked_at = ? WHERE id = ?", (int(time.time()), row[0]))
        return next(r for r in self.list() if r.id == row[0])

    def lookup(self, key: str) -> KeyRecord | None:
        """The live key's record, or None (unknown or revoked)."""
        with self._db() as db:
            row = db.execute("SELECT id, tier, hint, created_at, revoked_at FROM keys "
                             "WHERE hash = ? AND revoked_at IS NULL", (self._hash(key),)).fetchone()
        return KeyRecord(*row) if row else None

    def num_active(self) -> int:
        with self._db() as db:
            return db.execute("SELECT COUNT(*) FROM keys WHERE revoked_at IS NULL").fetchone()[0]
