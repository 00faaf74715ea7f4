"""The `browser` tool: `search`, `open`, `find` over per-conversation page stacks."""

from __future__ import annotations

import asyncio
import json
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..base import Citation, Tool, ToolInvocation, ToolOutput
from .backend import BackendError, Page, SearchBackend
from .render import Link, Span, View, domain_of, page_view, render, wrap

FUNCTIONS = ("search", "open", "find")


@dataclass(frozen=True, slots=True)
class BrowserConfig:
    """Browser behaviour.

    view_lines: lines shown by `open` when num_lines is -1.
    width: wrap width of page lines.
    max_topn: cap on search `topn`.
    max_conversations: conversation states kept (least recently used dropped first).
    max_pages: page views kept per conversation (older cursors then become invalid).
    max_cached_pages: fetched documents cached per conversation (oldest dropped first).
    """

    view_lines: int = 60
    width: int = 80
    max_topn: int = 20
    max_conversations: int = 512
    max_pages: int = 200
    max_cached_pages: int = 32


@dataclass(slots=True)
class BrowserState:
    """One conversation's browser: the page stack (cursor = index) and a page cache."""

    views: list[View] = field(default_factory=list)
    cache: dict[str, Page] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def view(self, cursor: int) -> View:
        if not self.views:
            raise BackendError("no page is open yet: use search or open first")
        idx = len(self.views) - 1 if cursor == -1 else cursor
        if not 0 <= idx < len(self.views):
            raise BackendError(f"invalid cursor {cursor}: pages are 0 to {len(self.views) - 1}")
        return self.views[idx]

    def push(self, view: View, max_pages: int) -> int:
        self.views.append(view)
        if len(self.views) > max_pages:
            # keep indices stable: forget the content, not the slot
            old = self.views[len(self.views) - max_pages - 1]
            old.lines, old.links = [], {}
        return len(self.views) - 1


class _ArgError(Exception):
    pass


def _parse_args(raw: str) -> dict[str, Any]:
    raw = raw.strip()
    if not raw:
        return {}
    try:
        args = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise _ArgError(f"arguments must be a JSON object ({exc.msg} at position {exc.pos})") \
            from None
    if not isinstance(args, dict):
        raise _ArgError("arguments must be a JSON object")
    return args


def _int(args: dict[str, Any], key: str, default: int) -> int:
    v = args.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise _ArgError(f"{key} must be an integer")
    try:
        return int(v)
    except ValueError:
        raise _ArgError(f"{key} must be an integer") from None


class BrowserTool(Tool):
    """The `browser` tool (recipients "browser.search", "browser.open", "browser.find").

    State is kept per `conversation_id` (None: a throwaway state for that one call), so the
    server must pass the same id for every call of a conversation; `annotate(text, id)` then
    maps the model's `【cursor†Lx-Ly】` citations to URLs.
    """

    name = "browser"

    def __init__(self, backend: SearchBackend, config: BrowserConfig | None = None) -> None:
        self.backend = backend
        self.config = config or BrowserConfig()
        self._states: OrderedDict[str, BrowserState] = OrderedDict()

    def state(self, conversation_id: str | None) -> BrowserState:
        """The conversation's state (created on first use; None: a fresh one)."""
        if conversation_id is None:
            return BrowserState()
        st = self._states.get(conversation_id)
        if st is None:
            st = self._states[conversation_id] = BrowserState()
            while len(self._states) > self.config.max_conversations:
                self._states.popitem(last=False)
        self._states.move_to_end(conversation_id)
        return st

    def forget(self, conversation_id: str) -> None:
        self._states.pop(conversation_id, None)

    def annotate(self, text: str, conversation_id: str | None,
                 style: str = "keep") -> tuple[str, list[UrlCitation]]:
        """`annotate_citations` with this conversation's state."""
        st = self._states.get(conversation_id) if conversation_id else None
        return annotate_citations(text, st or BrowserState(), style=style)

    def annotator(self, conversation_id: str | None) -> Callable[[str], list[dict[str, Any]]]:
        """text -> `url_citation` dicts for this conversation (markers kept in the text)."""
        def annotate(text: str) -> list[dict[str, Any]]:
            return [c.to_dict() for c in self.annotate(text, conversation_id)[1]]
        return annotate

    async def aclose(self) -> None:
        await self.backend.aclose()

    async def run(self, call: ToolInvocation) -> ToolOutput:
        fn = call.function
        if call.namespace != "browser" or fn not in FUNCTIONS:
            return ToolOutput.failure(
                f"unknown browser function {call.recipient!r}; use browser.search, "
                f"browser.open or browser.find")
        st = self.state(call.conversation_id)
        try:
            args = _parse_args(call.args)
            async with st.lock:
                if fn == "search":
                    return await self._search(st, args)
                if fn == "open":
                    return await self._open(st, args)
                return self._find(st, args)
        except _ArgError as exc:
            return ToolOutput.failure(f"invalid arguments for browser.{fn}: {exc}")
        except BackendError as exc:
            return ToolOutput.failure(str(exc))
        except Exception as exc:  # noqa: BLE001 - contract: run never raises
            return ToolOutput.failure(f"browser.{fn} failed: {type(exc).__name__}: {exc}")

    # -- functions ------------------------------------------------------------------------
    async def _search(self, st: BrowserState, args: dict[str, Any]) -> ToolOutput:
        query = args.get("query")
        if not isinstance(query, str) or not query.strip():
            raise _ArgError("query must be a non-empty string")
        topn = max(1, min(_int(args, "topn", 10), self.config.max_topn))
        results = await self.backend.search(query, topn)
        lines: list[str] = []
        links: dict[int, Link] = {}
        spans: list[Span] = []
        for i, r in enumerate(results):
            first = len(lines)
            title = " ".join(r.title.replace("†", " ").replace("【", "[").replace("】", "]")
                             .split())
            lines.append(f"# 【{i}†{title}†{domain_of(r.url)}】")
            lines.extend(wrap(r.snippet, self.config.width) if r.snippet else [])
            spans.append(Span(first, len(lines) - 1, r.url, r.title))
            lines.append("")
            links[i] = Link(url=r.url, title=r.title)
        if not results:
            lines = [f"No results for `{query}`."]
        view = View(url="", title=f"Search results for `{query}`", lines=lines, links=links,
                    kind="search", spans=spans)
        cursor = st.push(view, self.config.max_pages)
        text = render(view, cursor, 0, len(lines))
        cites = [Citation(url=r.url, title=r.title, kind="search_result", cursor=cursor,
                          snippet=r.snippet or None) for r in results]
        return ToolOutput(text=text, citations=cites,
                          meta={"cursor": cursor, "results": len(results)})

    async def _load(self, st: BrowserState, url: str) -> View:
        page = st.cache.get(url)
        if page is None:
            page = await self.backend.fetch(url)
            st.cache[url] = page
            if page.url != url:
                st.cache[page.url] = page
            while len(st.cache) > self.config.max_cached_pages:
                st.cache.pop(next(iter(st.cache)))
        return page_view(page.url, page.title, page.text, self.config.width)

    async def _open(self, st: BrowserState, args: dict[str, Any]) -> ToolOutput:
        raw_id = args.get("id", -1)
        cursor = _int(args, "cursor", -1)
        loc = _int(args, "loc", -1)
        num_lines = _int(args, "num_lines", -1)
        if isinstance(raw_id, str) and re.fullmatch(r"-?\d+", raw_id.strip()):
            raw_id = int(raw_id)
        if isinstance(raw_id, bool) or not isinstance(raw_id, (int, str)):
            raise _ArgError("id must be a link number or a URL")
        if isinstance(raw_id, str):
            view = await self._load(st, raw_id.strip())
        elif raw_id >= 0:
            src = st.view(cursor)
            link = src.links.get(raw_id)
            if link is None:
                raise BackendError(f"invalid link id {raw_id} on page "
                                   f"[{len(st.views) - 1 if cursor == -1 else cursor}]")
            view = await self._load(st, link.url)
            if loc < 0 and link.loc is not None:
                loc = link.loc
        else:
            src = st.view(cursor)  # scroll: show the page again from `loc`
            view = View(url=src.url, title=src.title, lines=src.lines, links=src.links,
                        kind=src.kind, spans=src.spans)
        loc = max(loc, 0)
        if loc and loc >= len(view.lines):
            raise BackendError(f"loc {loc} is past the end of the page "
                               f"(lines 0 to {len(view.lines) - 1})")
        n = self.config.view_lines if num_lines <= 0 else num_lines
        new_cursor = st.push(view, self.config.max_pages)
        cites = [] if view.kind == "search" else [
            Citation(url=view.url, title=view.title, kind="page", cursor=new_cursor)]
        return ToolOutput(text=render(view, new_cursor, loc, n), citations=cites,
                          meta={"cursor": new_cursor, "url": view.url,
                                "lines": len(view.lines)})

    def _find(self, st: BrowserState, args: dict[str, Any]) -> ToolOutput:
        pattern = args.get("pattern")
        if not isinstance(pattern, str) or not pattern.strip():
            raise _ArgError("pattern must be a non-empty string")
        cursor = _int(args, "cursor", -1)
        src = st.view(cursor)
        needle = pattern.lower()
        lines: list[str] = []
        links: dict[int, Link] = {}
        spans: list[Span] = []
        for i, line in enumerate(src.lines):
            nxt = src.lines[i + 1] if i + 1 < len(src.lines) else ""
            if needle not in line.lower():
                continue
            n = len(links)
            url, title = src.source_at(i)
            links[n] = Link(url=src.url or url, title=src.title, loc=i)
            first = len(lines)
            lines += [f"# 【{n}†match at L{i}】", line]
            if nxt:
                lines.append(nxt)
            spans.append(Span(first, len(lines) - 1, url, title))
            lines.append("")
            if n + 1 >= 50:
                break
        if not links:
            lines = [f"No `find` results for pattern: `{pattern}`"]
        view = View(url=src.url, title=f"Find results for text: `{pattern}` in `{src.title}`",
                    lines=lines, links=links, kind="find", spans=spans)
        new_cursor = st.push(view, self.config.max_pages)
        return ToolOutput(text=render(view, new_cursor, 0, len(lines)),
                          meta={"cursor": new_cursor, "matches": len(links)})


# -- citations ---------------------------------------------------------------------------
_CITATION = re.compile(r"【(\d+)†L(\d+)(?:\s*-\s*L?(\d+))?】")


@dataclass(frozen=True, slots=True)
class UrlCitation:
    """A `url_citation` annotation: text[start_index:end_index] cites url."""

    url: str
    title: str
    start_index: int
    end_index: int

    def to_dict(self) -> dict[str, Any]:
        """The Responses API `url_citation` annotation object."""
        return {"type": "url_citation", "start_index": self.start_index,
                "end_index": self.end_index, "url": self.url, "title": self.title}


def annotate_citations(text: str, state: BrowserState,
                       style: str = "keep") -> tuple[str, list[UrlCitation]]:
    """Map the model's `【{cursor}†L{a}-L{b}】` markers to URL citations.

    style "keep": text unchanged; each annotation spans its marker.
    style "domain": each resolvable marker is replaced by "({domain})" and the annotation
        spans that replacement (markers that do not resolve are left as they are).
    Markers naming an unknown cursor or a line past the page are not annotated.
    Indices are Python str indices (code points).
    """
    out: list[str] = []
    cites: list[UrlCitation] = []
    pos = 0
    length = 0
    for m in _CITATION.finditer(text):
        cursor, first = int(m.group(1)), int(m.group(2))
        if not 0 <= cursor < len(state.views):
            continue
        view = state.views[cursor]
        if first >= len(view.lines) and view.lines:
            continue
        url, title = view.source_at(first)
        if not url:
            continue
        out.append(text[pos:m.start()])
        length += m.start() - pos
        piece = m.group(0) if style == "keep" else f"({domain_of(url)})"
        cites.append(UrlCitation(url=url, title=title, start_index=length,
                                 end_index=length + len(piece)))
        out.append(piece)
        length += len(piece)
        pos = m.end()
    out.append(text[pos:])
    return "".join(out), cites
