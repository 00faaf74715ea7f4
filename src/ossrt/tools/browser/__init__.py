"""The `browser` tool: search / open / find with gpt-oss's page rendering, over pluggable
backends (`LocalCorpus`, the offline default; `SearxngBackend` for the web)."""

from __future__ import annotations

from .backend import BackendError, Page, Result, SearchBackend
from .corpus import LocalCorpus
from .fetch import FetchConfig, FetchError, FetchResponse, SafeFetcher
from .searxng import SearxngBackend
from .tool import BrowserConfig, BrowserState, BrowserTool, UrlCitation, annotate_citations

__all__ = [
    "BackendError", "BrowserConfig", "BrowserState", "BrowserTool", "FetchConfig", "FetchError",
    "FetchResponse", "LocalCorpus", "Page", "Result", "SafeFetcher", "SearchBackend",
    "SearxngBackend", "UrlCitation", "annotate_citations",
]
