"""The tool contract shared by every built-in tool, and a tiny registry.

Contract: `await tool.run(call)` never raises for anything the model can cause (bad
arguments, refused URLs, sandbox limits, missing sandbox); it returns a `ToolOutput` with
`ok=False`, a short `error`, and a `text` the model will read as the tool message. Only
programming errors (bugs) may escape, and `safe_run` turns even those into an output.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class ToolInvocation:
    """One tool call as the model wrote it.

    recipient: the Harmony recipient, e.g. "browser.search", "browser.open", "python".
    args: the raw message text (JSON for the browser, source code for python).
    conversation_id: groups calls that share state (browser pages, stateful python files);
        None means a fresh, throwaway state for this call.
    """

    recipient: str
    args: str
    conversation_id: str | None = None

    @property
    def namespace(self) -> str:
        """"browser" for "browser.search"; "python" for "python"."""
        return self.recipient.split(".", 1)[0]

    @property
    def function(self) -> str | None:
        """"search" for "browser.search"; None for a bare "python"."""
        parts = self.recipient.split(".", 1)
        return parts[1] if len(parts) == 2 else None


@dataclass(frozen=True, slots=True)
class Citation:
    """A source the model saw, for `url_citation` annotations and `sources` lists.

    kind: "search_result" (listed on a results page) or "page" (opened).
    cursor: the browser page index it was shown on, when the browser produced it.
    """

    url: str
    title: str
    kind: str = "page"
    cursor: int | None = None
    snippet: str | None = None


@dataclass(slots=True)
class ToolOutput:
    """What a tool call produced.

    text: exactly the tool message content the model sees next.
    ok: False when the call failed (bad arguments, refused, limit hit, sandbox missing).
    error: a short machine-friendly reason when ok is False (the model sees `text`).
    citations: sources shown by this call (browser only).
    meta: anything else for logs/metrics (exit code, cursor, timings, truncation...).
    """

    text: str
    ok: bool = True
    error: str | None = None
    citations: list[Citation] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def failure(cls, error: str, text: str | None = None, **meta: Any) -> ToolOutput:
        """A failed call whose `text` (default: "Error: {error}") is shown to the model."""
        return cls(text=text if text is not None else f"Error: {error}", ok=False,
                   error=error, meta=dict(meta))


class Tool(abc.ABC):
    """A built-in tool. `name` is its Harmony recipient namespace ("browser", "python")."""

    name: str

    @abc.abstractmethod
    async def run(self, call: ToolInvocation) -> ToolOutput:
        """Execute one call; must not raise for model-caused problems (see module doc)."""

    async def safe_run(self, call: ToolInvocation) -> ToolOutput:
        """`run`, with any unexpected exception turned into a failed output."""
        try:
            return await self.run(call)
        except Exception as exc:  # noqa: BLE001 - the contract is: never raise to the caller
            return ToolOutput.failure(f"internal tool error: {type(exc).__name__}: {exc}")

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release resources (HTTP clients, temp dirs). Default: nothing."""


ToolFactory = Callable[..., Tool]
_registry: dict[str, ToolFactory] = {}
_lock = threading.Lock()


def register(name: str, factory: ToolFactory) -> None:
    """Register (or replace) the factory that builds the tool named `name`."""
    with _lock:
        _registry[name] = factory


def get(name: str) -> ToolFactory:
    """The factory registered under `name`; KeyError naming the known tools otherwise."""
    with _lock:
        try:
            return _registry[name]
        except KeyError:
            raise KeyError(f"no tool {name!r}; registered: {sorted(_registry)}") from None


def registered() -> list[str]:
    """Names of the registered tools."""
    with _lock:
        return sorted(_registry)
