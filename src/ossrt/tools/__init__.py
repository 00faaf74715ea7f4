"""Built-in agentic tools for gpt-oss: the `python` sandbox and the `browser`.

The server calls these; nothing here imports torch, the model, the engine or the server.
Public API (see docs/tools.md):

- `Tool`, `ToolInvocation`, `ToolOutput`, `Citation`, `register`, `get`, `registered`
- `PythonTool`, `PythonSandboxConfig`, `sandbox_available`
- `BrowserTool`, `BrowserConfig`, `LocalCorpus`, `SearxngBackend`, `annotate_citations`
"""

from __future__ import annotations

from .base import Citation, Tool, ToolInvocation, ToolOutput, get, register, registered
from .browser import (BrowserConfig, BrowserTool, LocalCorpus, SearxngBackend, UrlCitation,
                      annotate_citations)
from .python_sandbox import PythonSandboxConfig, PythonTool, sandbox_available

__all__ = [
    "BrowserConfig", "BrowserTool", "Citation", "LocalCorpus", "PythonSandboxConfig",
    "PythonTool", "SearxngBackend", "Tool", "ToolInvocation", "ToolOutput", "UrlCitation",
    "annotate_citations", "get", "register", "registered", "sandbox_available",
]


def _default_registry() -> None:
    register("python", PythonTool)
    register("browser", BrowserTool)


_default_registry()
