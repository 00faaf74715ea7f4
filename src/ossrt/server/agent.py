"""Built-in tools for the Responses API: which a request may switch on, and running them.

`tools: [{"type": "web_search_preview"}]` (or `"web_search"`) switches on gpt-oss's native
`browser` tool, `[{"type": "code_interpreter", ...}]` its `python` tool, each only when the
server was started with it (`BuiltinTools`). The route's loop (routes_responses) generates
until the model calls one, runs it here, appends the result to the prompt and generates again,
at most `max_calls` times per response.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..tools import Tool, ToolInvocation, ToolOutput
from .errors import invalid
from .responses_output import Annotator

WEB_SEARCH_TYPES = frozenset({"web_search_preview", "web_search",
                              "web_search_preview_2025_03_11", "web_search_2025_08_26"})
DEFAULT_MAX_CALLS = 8


@dataclass
class BuiltinTools:
    """The server's built-in tools. A tool that is None is off, for the reason given."""

    browser: Tool | None = None
    python: Tool | None = None
    browser_off: str = ("web search is not enabled on this server: start it with "
                        "`ossrt serve --browser-corpus DIR` (a local folder of documents) or "
                        "`--searxng URL`")
    python_off: str = "code_interpreter is not enabled on this server"
    max_calls: int = DEFAULT_MAX_CALLS  # per response, unless the request asks for fewer

    def tool(self, recipient: str) -> Tool | None:
        return self.python if recipient == "python" else self.browser

    async def run(self, recipient: str, arguments: str, conversation_id: str) -> ToolOutput:
        tool = self.tool(recipient)
        if tool is None:  # cannot happen for a call the builder accepted; never raise anyway
            return ToolOutput.failure(f"tool {recipient!r} is not available")
        return await tool.safe_run(ToolInvocation(recipient, arguments, conversation_id))

    def annotator(self, conversation_id: str) -> Annotator | None:
        """Maps the model's `【cursor†Lx-Ly】` citations in final text to url_citation
        annotations, from the pages this conversation's browser showed."""
        browser = self.browser
        annotate = getattr(browser, "annotate", None)
        if annotate is None:
            return None

        def notes(text: str) -> list[dict[str, Any]]:
            _, cites = annotate(text, conversation_id)
            return [{"type": "url_citation", "start_index": c.start_index,
                     "end_index": c.end_index, "url": c.url, "title": c.title} for c in cites]
        return notes


def builtin_of(tool: dict[str, Any], index: int, tools: BuiltinTools | None) -> str | None:
    """"browser" / "python" for a hosted-tool entry of `tools`; None if it is not one. A hosted
    tool this server does not run is a 400 saying how to switch it on."""
    kind = tool.get("type")
    if kind in WEB_SEARCH_TYPES:
        if tools is None or tools.browser is None:
            raise invalid((tools or BuiltinTools()).browser_off, f"tools[{index}].type",
                          code="tool_not_enabled")
        return "browser"
    if kind == "code_interpreter":
        if tools is None or tools.python is None:
            raise invalid((tools or BuiltinTools()).python_off, f"tools[{index}].type",
                          code="tool_not_enabled")
        return "python"
    return None


def configure_builtins(data_dir: Path, *, browser: bool = True, corpus: str | None = None,
                       searxng: str | None = None, python: bool = True,
                       unsafe_python: bool = False, python_stateful: bool = False,
                       max_calls: int = DEFAULT_MAX_CALLS) -> tuple[BuiltinTools, str]:
    """The server's built-in tools and a one-line banner saying what is on and why not.

    Browser: `searxng` (web search through a SearXNG instance) if given, else the local corpus
    `corpus` (default DATA_DIR/corpus, created empty). Python: bubblewrap sandbox; where it
    cannot run the tool is off, unless `unsafe_python` (rlimits only, no sandbox)."""
    from ..tools import BrowserTool, LocalCorpus, PythonSandboxConfig, PythonTool, SearxngBackend
    from ..tools import sandbox_available

    tools = BuiltinTools(max_calls=max_calls)
    notes = []
    if browser:
        if searxng:
            tools.browser = BrowserTool(SearxngBackend(searxng))
            notes.append(f"web search via SearXNG at {searxng}")
        else:
            folder = Path(corpus) if corpus else data_dir / "corpus"
            folder.mkdir(parents=True, exist_ok=True)
            tools.browser = BrowserTool(LocalCorpus(folder))
            notes.append(f"web search over the local corpus {folder}")
    else:
        tools.browser_off = "web search is switched off on this server (--no-browser)"
    if python:
        config = PythonSandboxConfig(unsafe=unsafe_python, stateful=python_stateful)
        ok, reason = sandbox_available(config)
        if ok or unsafe_python:
            tools.python = PythonTool(config)
            notes.append("code_interpreter in a bubblewrap sandbox" if ok else
                         "code_interpreter WITHOUT a sandbox (--unsafe-python)")
        else:
            tools.python_off = (f"code_interpreter is off on this server: its sandbox cannot run "
                                f"({reason}); install bubblewrap, or start the server with "
                                "--unsafe-python to run code without a sandbox")
            notes.append("code_interpreter off (no sandbox)")
    else:
        tools.python_off = "code_interpreter is switched off on this server (--no-python)"
    return tools, "built-in tools: " + ("; ".join(notes) or "none")
