"""`SearxngBackend`: web search through a SearXNG instance's JSON API, pages fetched with
`SafeFetcher` (SSRF policy in fetch.py) and turned into text by trafilatura (stdlib fallback).

The SearXNG instance itself is operator-configured, so its URL may be on a private network
(e.g. http://127.0.0.1:8888); only the *page* fetches, whose URLs come from the model or
search results, go through the SSRF checks. The instance must have `json` in
`search.formats` of its settings.yml.
"""

from __future__ import annotations

import httpx

from .backend import BackendError, Page, Result
from .fetch import FetchConfig, FetchError, SafeFetcher
from .html_text import html_to_text

_TEXT_TYPES = ("text/plain", "text/markdown", "text/x-markdown", "application/json",
               "text/csv")


class SearxngBackend:
    """A `SearchBackend` over SearXNG (`GET {base_url}/search?q=...&format=json`)."""

    def __init__(self, base_url: str, *, fetch_config: FetchConfig | None = None,
                 fetcher: SafeFetcher | None = None, timeout_s: float = 10.0,
                 categories: str | None = None, language: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.fetcher = fetcher or SafeFetcher(fetch_config)
        self.categories = categories
        self.language = language
        self._client = httpx.AsyncClient(trust_env=False, timeout=timeout_s)

    async def search(self, query: str, topn: int) -> list[Result]:
        params = {"q": query, "format": "json"}
        if self.categories:
            params["categories"] = self.categories
        if self.language:
            params["language"] = self.language
        try:
            resp = await self._client.get(f"{self.base_url}/search", params=params)
            resp.raise_for_status()
            data = resp.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise BackendError(f"search failed: {type(exc).__name__}: {exc}") from None
        results = []
        for item in data.get("results", []):
            url = item.get("url")
            if not url:
                continue
            results.append(Result(url=url, title=(item.get("title") or url).strip(),
                                  snippet=" ".join((item.get("content") or "").split())))
            if len(results) >= topn:
                break
        return results

    async def fetch(self, url: str) -> Page:
        resp = await self.fetcher.get(url)
        if resp.status >= 400:
            raise FetchError(f"HTTP {resp.status} fetching {resp.url}")
        ctype = resp.content_type.split(";")[0].strip().lower()
        raw = resp.text()
        if ctype in ("text/html", "application/xhtml+xml") or (not ctype and "<html" in raw[:2000].lower()):
            title, text = html_to_text(raw, resp.url)
        elif ctype in _TEXT_TYPES or ctype.startswith("text/"):
            title, text = resp.url, raw
        else:
            raise FetchError(f"cannot display {resp.url}: unsupported content type {ctype!r}")
        if resp.truncated:
            text += f"\n\n[page truncated at {self.fetcher.config.max_bytes} bytes]"
        return Page(url=resp.url, title=title or resp.url, text=text)

    async def aclose(self) -> None:
        await self._client.aclose()
        await self.fetcher.aclose()
