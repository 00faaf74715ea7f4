"""Turning pages into the numbered-line views gpt-oss's browser was trained on.

A view is a list of lines (wrapped at `width`) in which every link is written
`【{id}†{text}†{domain}】`; `open` with that id follows it. Display:

    [{cursor}] {title} ({url})
    **viewing lines [{first} - {last}] of {last line index}**

    L{first}: ...
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

from .corpus import SCHEME, corpus_join

_MD_LINK = re.compile(r"(!?)\[([^\]\n]*)\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_MARKER = re.compile(r"【[^】\n]*】")


@dataclass(frozen=True, slots=True)
class Link:
    url: str
    title: str
    loc: int | None = None  # line to show when followed (find results)


@dataclass(frozen=True, slots=True)
class Span:
    """Lines first..last (inclusive) of a results page that come from one source."""

    first: int
    last: int
    url: str
    title: str


@dataclass(slots=True)
class View:
    """One entry of the browser's page stack (its index is the cursor)."""

    url: str
    title: str
    lines: list[str]
    links: dict[int, Link] = field(default_factory=dict)
    kind: str = "page"  # "page", "search", "find"
    spans: list[Span] = field(default_factory=list)

    def source_at(self, line: int) -> tuple[str, str]:
        """(url, title) of the document line `line` came from."""
        for s in self.spans:
            if s.first <= line <= s.last:
                return s.url, s.title
        return self.url, self.title


def domain_of(url: str) -> str:
    if url.startswith(SCHEME):
        return "corpus"
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:
        host = ""
    return host.removeprefix("www.") or url


def _clean(text: str) -> str:
    return " ".join(text.replace("†", " ").replace("【", "[").replace("】", "]").split())


def wrap(text: str, width: int) -> list[str]:
    """Wrap each paragraph line to `width` without splitting a 【...】 marker."""
    out: list[str] = []
    for raw in text.split("\n"):
        if not raw.strip():
            out.append("")
            continue
        protected = _MARKER.sub(lambda m: m.group(0).replace(" ", "\x00"), raw.rstrip())
        parts = textwrap.wrap(protected, width=width, break_long_words=False,
                              break_on_hyphens=False, replace_whitespace=False) or [""]
        out.extend(p.replace("\x00", " ") for p in parts)
    return out


def page_view(url: str, title: str, text: str, width: int = 80) -> View:
    """A document's view: markdown links become numbered `【id†text†domain】` markers."""
    links: dict[int, Link] = {}
    join: Callable[[str, str], str] = corpus_join if url.startswith(SCHEME) else urljoin

    def repl(m: re.Match[str]) -> str:
        bang, label, href = m.groups()
        label = _clean(label)
        if bang:  # an image: keep its alt text only
            return f"[image: {label}]" if label else ""
        target = join(url, href)
        n = len(links)
        links[n] = Link(url=target, title=label or target)
        return f"【{n}†{label or domain_of(target)}†{domain_of(target)}】"

    body = _MD_LINK.sub(repl, text.replace("\r\n", "\n"))
    lines = wrap(body, width)
    if url and not url.startswith(SCHEME):
        lines = [f"URL: {url}"] + lines
    return View(url=url, title=title, lines=lines, links=links)


def render(view: View, cursor: int, loc: int, num_lines: int) -> str:
    """The text the model sees for lines [loc, loc + num_lines) of `view`."""
    total = len(view.lines)
    last = min(loc + num_lines, total) - 1
    header = f"[{cursor}] {view.title}" + (f" ({view.url})" if view.url else "")
    body = "\n".join(f"L{i}: {view.lines[i]}" for i in range(loc, last + 1))
    return f"{header}\n**viewing lines [{loc} - {last}] of {total - 1}**\n\n{body}"
