"""Built-in agentic tools for gpt-oss: the `python` sandbox and the `browser`.

The server calls these; nothing here imports torch, the model, the engine or the server.
Public API (see docs/tools.md):

- `Tool`, `ToolInvocation`, `ToolOutput`, `Citation`, `register`, `get`, `registered`
- `PythonTool`, `PythonSandboxConfig`, `sandbox_available`
- `BrowserTool`, `BrowserConfig`, `LocalCorpus`, `SearxngBackend`, `annotate_citations`
"""

from __future__ import annotations

from .base import Citation, Tool, ToolInvocation, ToolOutput, get, register, registered
from .python_sandbox import PythonSandboxConfig, PythonTool, sandbox_available

__all__ = [
    "Citation", "PythonSandboxConfig", "PythonTool", "Tool", "ToolInvocation", "ToolOutput",
    "get", "register", "registered", "sandbox_available",
]
