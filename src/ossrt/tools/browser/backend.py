"""The search backend interface the browser tool talks to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class Result:
    """One search hit."""

    url: str
    title: str
    snippet: str = ""


@dataclass(frozen=True, slots=True)
class Page:
    """A fetched document as text. Links are written inline as markdown `[text](url)`."""

    url: str
    title: str
    text: str


class BackendError(Exception):
    """A refusal or failure whose message is shown to the model as is."""


@runtime_checkable
class SearchBackend(Protocol):
    """Where `search` and `open` go.

    search: at most `topn` results, best first; [] when nothing matches.
    fetch: the document at `url`; raises BackendError (message for the model) when the URL
        is refused, unreachable, or not text.
    """

    async def search(self, query: str, topn: int) -> list[Result]: ...

    async def fetch(self, url: str) -> Page: ...

    async def aclose(self) -> None: ...
