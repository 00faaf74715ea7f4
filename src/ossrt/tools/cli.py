"""`ossrt tool ...`: run a built-in tool directly and print exactly what the model would see.

    ossrt tool python --code "print(6*7)" [--unsafe-python]
    ossrt tool browser --corpus DIR search "QUERY"
    ossrt tool browser --corpus DIR open corpus://doc.md     (or a path inside DIR)
    ossrt tool browser --searxng http://127.0.0.1:8888 open https://example.com
    ossrt tool browser --corpus DIR find PATTERN --url corpus://doc.md

Each invocation has a fresh browser state, so `open N` (a link number) only makes sense within
one process; `open` of a URL and `find --url` work alone. Exit status: 0 when the call
succeeded, 1 when the tool reported a failure (its text is still printed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from .base import Tool, ToolInvocation, ToolOutput


def _print(out: ToolOutput, as_json: bool) -> int:
    if as_json:
        print(json.dumps({"ok": out.ok, "error": out.error, "text": out.text,
                          "citations": [c.__dict__ if hasattr(c, "__dict__") else
                                        {k: getattr(c, k) for k in c.__slots__}
                                        for c in out.citations],
                          "meta": out.meta}, default=str))
    else:
        sys.stdout.write(out.text if out.text.endswith("\n") else out.text + "\n")
    return 0 if out.ok else 1


def _cmd_python(args: argparse.Namespace) -> int:
    from .python_sandbox import PythonSandboxConfig, PythonTool

    code = sys.stdin.read() if args.code == "-" else args.code
    cfg = PythonSandboxConfig(unsafe=args.unsafe_python, wall_s=args.wall_s, cpu_s=args.cpu_s,
                              memory_mb=args.memory_mb)
    out = asyncio.run(PythonTool(cfg).run(ToolInvocation("python", code)))
    return _print(out, args.json)


def _backend(args: argparse.Namespace) -> Any:
    from .browser import FetchConfig, LocalCorpus, SafeFetcher, SearxngBackend

    if args.searxng:
        return SearxngBackend(args.searxng, fetcher=SafeFetcher(
            FetchConfig(allow_private=args.allow_private)))
    if args.corpus:
        return LocalCorpus(args.corpus, cache_dir=args.cache_dir)
    raise ValueError("give --corpus DIR (a local folder to search) or --searxng URL")


async def _browse(tool: Tool, calls: list[tuple[str, dict[str, Any]]]) -> ToolOutput:
    out = ToolOutput(text="")
    try:
        for fn, fargs in calls:
            out = await tool.run(ToolInvocation(f"browser.{fn}", json.dumps(fargs), "cli"))
            if not out.ok:
                break
    finally:
        await tool.aclose()
    return out


def _as_url(ref: str, args: argparse.Namespace) -> str | int:
    if ref.lstrip("-").isdigit():
        return int(ref)
    if "://" not in ref and args.corpus and not args.searxng:
        return "corpus://" + ref.removeprefix("./")
    return ref


def _cmd_browser(args: argparse.Namespace) -> int:
    from .browser import BrowserTool

    tool = BrowserTool(_backend(args))
    if args.browser_fn == "search":
        calls = [("search", {"query": args.query, "topn": args.topn})]
    elif args.browser_fn == "open":
        calls = [("open", {"id": _as_url(args.ref, args), "loc": args.loc,
                           "num_lines": args.num_lines})]
    else:
        if not args.url:
            raise ValueError("find needs --url URL (the page to search in)")
        calls = [("open", {"id": _as_url(args.url, args)}), ("find", {"pattern": args.pattern})]
    return _print(asyncio.run(_browse(tool, calls)), args.json)


def register_cli(subparsers: Any) -> None:
    """Add `ossrt tool python|browser ...` to the `ossrt` command's subparsers."""
    tool = subparsers.add_parser("tool", help="run a built-in tool (python, browser) and print "
                                              "what the model would see")
    tsub = tool.add_subparsers(dest="tool_name", required=True)

    py = tsub.add_parser("python", help="run code in the python tool's sandbox")
    py.add_argument("--code", required=True, help="the code ('-' reads it from stdin)")
    py.add_argument("--unsafe-python", action="store_true",
                    help="run without bubblewrap (rlimits only) when the sandbox is unavailable")
    py.add_argument("--wall-s", type=float, default=15.0)
    py.add_argument("--cpu-s", type=int, default=10)
    py.add_argument("--memory-mb", type=int, default=512)
    py.add_argument("--json", action="store_true", help="print the whole ToolOutput as JSON")
    py.set_defaults(func=_cmd_python)

    br = tsub.add_parser("browser", help="search / open / find with the browser tool")
    br.add_argument("--corpus", help="folder of .txt/.md/.html files (offline backend)")
    br.add_argument("--cache-dir", help="keep the corpus index here (default: in memory)")
    br.add_argument("--searxng", help="SearXNG base URL (web backend)")
    br.add_argument("--allow-private", action="store_true",
                    help="let open reach private/loopback addresses (testing only)")
    br.add_argument("--json", action="store_true", help="print the whole ToolOutput as JSON")
    bsub = br.add_subparsers(dest="browser_fn", required=True)
    s = bsub.add_parser("search")
    s.add_argument("query")
    s.add_argument("--topn", type=int, default=10)
    o = bsub.add_parser("open")
    o.add_argument("ref", help="a URL, or a path inside --corpus")
    o.add_argument("--loc", type=int, default=-1)
    o.add_argument("--num-lines", type=int, default=-1)
    f = bsub.add_parser("find")
    f.add_argument("pattern")
    f.add_argument("--url", help="the page to open first")
    br.set_defaults(func=_cmd_browser)
