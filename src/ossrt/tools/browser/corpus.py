"""`LocalCorpus`: offline search over a folder of .txt/.md/.html files (SQLite FTS5, bm25).

URLs are `corpus://<path relative to the folder>` (percent-encoded). `fetch` serves only
indexed-kind files that really live inside the folder: absolute paths, `..` and symlinks
leading outside are refused. The index (one SQLite file per folder in `cache_dir`, or in
memory) is refreshed when files are added, removed, or their size/mtime changes; the folder is
rescanned at most every `rescan_interval_s` seconds.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import posixpath
import re
import sqlite3
import threading
import time
from pathlib import Path
from urllib.parse import quote, unquote

from .backend import BackendError, Page, Result
from .html_text import html_to_text

SCHEME = "corpus://"
DEFAULT_EXTENSIONS = (".txt", ".md", ".markdown", ".html", ".htm")


def corpus_join(base_url: str, href: str) -> str:
    """Resolve a relative link found in a corpus document (absolute URLs pass through)."""
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", href) or not base_url.startswith(SCHEME):
        return href
    base = unquote(base_url[len(SCHEME):])
    href = href.split("#", 1)[0]
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(base), unquote(href)))
    return SCHEME + quote(joined.lstrip("/"))


def _plain(snippet: str) -> str:
    """A snippet without markdown link/heading syntax, whitespace collapsed."""
    snippet = re.sub(r"!?\[([^\]\n]*)\]\([^)\s]*\)", r"\1", snippet)
    snippet = re.sub(r"(^|\s)#+\s", r"\1", snippet)
    return " ".join(snippet.split())


def _extract(path: Path, raw: str) -> tuple[str, str]:
    """(title, text) of a corpus file."""
    if path.suffix.lower() in (".html", ".htm"):
        title, text = html_to_text(raw)
        return title or path.name, text
    text = raw.replace("\r\n", "\n")
    for line in text.splitlines():
        line = line.strip()
        if line:
            title = line.lstrip("#").strip() if path.suffix.lower() in (".md", ".markdown") \
                else line
            return (title if len(title) <= 100 else path.name), text
    return path.name, text


class LocalCorpus:
    """A `SearchBackend` over a local folder (the default backend: no network at all)."""

    def __init__(self, root: str | os.PathLike[str], *, cache_dir: str | None = None,
                 extensions: tuple[str, ...] = DEFAULT_EXTENSIONS,
                 max_file_bytes: int = 5_000_000, rescan_interval_s: float = 2.0) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise ValueError(f"corpus folder {root} does not exist")
        self.extensions = tuple(e.lower() for e in extensions)
        self.max_file_bytes = max_file_bytes
        self.rescan_interval_s = rescan_interval_s
        if cache_dir:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            key = hashlib.sha256(str(self.root).encode()).hexdigest()[:16]
            db = str(Path(cache_dir) / f"corpus-{key}.sqlite3")
        else:
            db = ":memory:"
        self._db = sqlite3.connect(db, check_same_thread=False)
        self._db.executescript(
            "CREATE TABLE IF NOT EXISTS files(path TEXT PRIMARY KEY, mtime_ns INTEGER, "
            "size INTEGER);"
            "CREATE VIRTUAL TABLE IF NOT EXISTS docs USING fts5(path UNINDEXED, title, body, "
            "tokenize='porter unicode61');")
        self._lock = threading.Lock()
        self._last_scan = float("-inf")

    # -- paths and URLs -------------------------------------------------------------------
    def url_for(self, relpath: str) -> str:
        return SCHEME + quote(relpath)

    def path_for(self, url: str) -> Path:
        """The file behind a corpus URL (or a bare relative path); BackendError for anything
        outside the folder."""
        if "://" not in url and not url.startswith(("/", "file:", "data:")):
            url = SCHEME + url
        if not url.startswith(SCHEME):
            raise BackendError(f"refused {url!r}: this browser only has the local corpus "
                               f"(URLs look like {SCHEME}path/to/doc.md)")
        rel = unquote(url[len(SCHEME):]).split("#", 1)[0]
        parts = rel.replace("\\", "/").split("/")
        if not rel or rel.startswith("/") or ".." in parts or "\x00" in rel:
            raise BackendError(f"refused {url!r}: path outside the corpus")
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root):
            raise BackendError(f"refused {url!r}: path outside the corpus")
        if not path.is_file() or path.suffix.lower() not in self.extensions:
            raise BackendError(f"no document {url!r} in the corpus")
        return path

    # -- index ----------------------------------------------------------------------------
    def _scan(self) -> dict[str, tuple[int, int]]:
        found: dict[str, tuple[int, int]] = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.startswith(".") or not name.lower().endswith(self.extensions):
                    continue
                full = Path(dirpath) / name
                try:
                    real = full.resolve()
                    if not real.is_relative_to(self.root):
                        continue  # a symlink leading outside: never indexed
                    st = real.stat()
                except OSError:
                    continue
                if st.st_size <= self.max_file_bytes:
                    found[full.relative_to(self.root).as_posix()] = (st.st_mtime_ns, st.st_size)
        return found

    def refresh(self, force: bool = False) -> int:
        """Re-index changed files; returns how many were (re)indexed or dropped."""
        with self._lock:
            now = time.monotonic()
            if not force and now - self._last_scan < self.rescan_interval_s:
                return 0
            self._last_scan = now
            found = self._scan()
            known = {p: (m, s) for p, m, s in self._db.execute(
                "SELECT path, mtime_ns, size FROM files")}
            changed = 0
            with self._db:
                for rel in known.keys() - found.keys():
                    self._db.execute("DELETE FROM files WHERE path = ?", (rel,))
                    self._db.execute("DELETE FROM docs WHERE path = ?", (rel,))
                    changed += 1
                for rel, sig in found.items():
                    if known.get(rel) == sig:
                        continue
                    path = self.root / rel
                    try:
                        title, text = _extract(path, path.read_text("utf-8", "replace"))
                    except OSError:
                        continue
                    self._db.execute("DELETE FROM docs WHERE path = ?", (rel,))
                    self._db.execute("INSERT INTO docs(path, title, body) VALUES (?, ?, ?)",
                                     (rel, title, text))
                    self._db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?)",
                                     (rel, *sig))
                    changed += 1
            return changed

    def _search(self, query: str, topn: int) -> list[Result]:
        self.refresh()
        terms = re.findall(r"\w+", query.lower())
        if not terms:
            return []
        match = " OR ".join(f'"{t}"' for t in terms)
        with self._lock:
            rows = self._db.execute(
                "SELECT path, title, snippet(docs, 2, '', '', '…', 24) FROM docs "
                "WHERE docs MATCH ? ORDER BY bm25(docs, 0.0, 4.0, 1.0) LIMIT ?",
                (match, max(1, topn))).fetchall()
        results = []
        for path, title, snip in rows:
            snip = _plain(snip)
            if snip.startswith(title):  # the document's own heading opens most snippets
                snip = snip[len(title):].lstrip()
            results.append(Result(url=self.url_for(path), title=title, snippet=snip))
        return results

    def _fetch(self, url: str) -> Page:
        path = self.path_for(url)
        if path.stat().st_size > self.max_file_bytes:
            raise BackendError(f"document {url!r} is larger than {self.max_file_bytes} bytes")
        title, text = _extract(path, path.read_text("utf-8", "replace"))
        return Page(url=self.url_for(path.relative_to(self.root).as_posix()), title=title,
                    text=text)

    # -- SearchBackend --------------------------------------------------------------------
    async def search(self, query: str, topn: int) -> list[Result]:
        return await asyncio.to_thread(self._search, query, topn)

    async def fetch(self, url: str) -> Page:
        return await asyncio.to_thread(self._fetch, url)

    async def aclose(self) -> None:
        with self._lock:
            self._db.close()
