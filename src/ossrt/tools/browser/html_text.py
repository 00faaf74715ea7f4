"""HTML to readable markdown-ish text: trafilatura when installed (the `web` extra), else a
small stdlib `html.parser` fallback. Links stay inline as `[text](absolute url)`."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from urllib.parse import urljoin

_BLOCK = {"p", "div", "section", "article", "main", "header", "footer", "table", "tr", "ul",
          "ol", "blockquote", "pre", "form", "dl", "dt", "dd", "figure", "br", "hr"}
_SKIP = {"script", "style", "noscript", "template", "svg", "head", "iframe", "object"}


class _TextParser(HTMLParser):
    def __init__(self, base_url: str) -> None:
        super().__init__(convert_charrefs=True)
        self.base_url = base_url
        self.out: list[str] = []
        self.title = ""
        self._skip = 0
        self._in_title = False
        self._link: tuple[str, list[str]] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self._in_title = True
        if tag in _SKIP:
            self._skip += 1
            return
        if tag in _BLOCK:
            self.out.append("\n\n" if tag in ("p", "div", "table") else "\n")
        elif tag in ("h1", "h2", "h3", "h4", "h5", "h6"):
            self.out.append("\n\n" + "#" * int(tag[1]) + " ")
        elif tag == "li":
            self.out.append("\n- ")
        elif tag in ("td", "th"):
            self.out.append(" | ")
        elif tag == "a":
            href = dict(attrs).get("href")
            if href and not href.startswith(("javascript:", "#", "mailto:")):
                self._link = (urljoin(self.base_url, href) if self.base_url else href, [])

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        if tag in _SKIP:
            self._skip = max(0, self._skip - 1)
            return
        if tag == "a" and self._link is not None:
            url, parts = self._link
            self._link = None
            text = " ".join("".join(parts).split())
            self.out.append(f"[{text}]({url})" if text else "")
        elif tag in _BLOCK or tag.startswith("h") and tag[1:].isdigit():
            self.out.append("\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        if self._skip:
            return
        text = re.sub(r"\s+", " ", data)
        if self._link is not None:
            self._link[1].append(text)
        else:
            self.out.append(text)


def _tidy(text: str) -> str:
    lines = [line.strip() for line in text.splitlines()]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def html_title(html: str) -> str:
    """The document's <title>, whitespace-collapsed ("" when none)."""
    p = _TextParser("")
    try:
        p.feed(html)
    except Exception:  # noqa: BLE001 - malformed HTML: best effort
        pass
    return " ".join(p.title.split())


def html_to_text_stdlib(html: str, base_url: str = "") -> tuple[str, str]:
    """(title, text) with the stdlib parser: every visible text, links as markdown."""
    p = _TextParser(base_url)
    try:
        p.feed(html)
        p.close()
    except Exception:  # noqa: BLE001
        pass
    return " ".join(p.title.split()), _tidy("".join(p.out))


def html_to_text(html: str, base_url: str = "") -> tuple[str, str]:
    """(title, text): trafilatura's main-content extraction when available, else stdlib."""
    title = html_title(html)
    try:
        import trafilatura  # lazy: optional `web` extra
    except ImportError:
        return html_to_text_stdlib(html, base_url)
    try:
        text = trafilatura.extract(html, url=base_url or None, output_format="markdown",
                                   include_links=True, favor_recall=True)
    except Exception:  # noqa: BLE001 - a parser crash must not fail the call
        text = None
    if not text:
        return html_to_text_stdlib(html, base_url)
    return title, _tidy(text)
