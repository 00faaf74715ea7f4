"""`ossrt chat`: a terminal chat client over the Responses API.

With `--url` it is a plain HTTP client (the official `openai` package); without it, it serves
`--model DIR` (or the server's default model) in-process on a free loopback port and talks to
that the same way, so there is one code path. History is kept server-side: each turn chains
to the last one with `previous_response_id` (store=True).

Nothing here imports torch at import time: only the in-process server does, when started.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

EFFORTS = ("low", "medium", "high")
BUILTIN_TOOLS: list[dict[str, Any]] = [
    {"type": "code_interpreter", "container": {"type": "auto"}},
    {"type": "web_search_preview"},
]
HELP = """commands:
  /effort low|medium|high   reasoning effort of the next turns
  /reset                    forget the history (the next turn starts a new conversation)
  /history                  list the turns of this session (with their response ids)
  /tools on|off             offer the built-in python and browser tools
  /reasoning show|hide      stream the reasoning, or collapse it to one line
  /max N|off                max output tokens per turn
  /help                     this text
  /quit                     exit (Ctrl-D too); Ctrl-C stops a generation"""


@dataclass
class Turn:
    text: str
    response_id: str | None = None
    previous_id: str | None = None
    effort: str = "medium"
    status: str = "?"
    output_tokens: int | None = None


@dataclass
class ChatSession:
    client: Any  # openai.OpenAI
    model: str
    effort: str = "medium"
    show_reasoning: bool = True
    tools: bool = False
    max_output_tokens: int | None = None
    color: bool = True
    out: Any = sys.stdout
    previous_id: str | None = None
    turns: list[Turn] = field(default_factory=list)

    # -- output helpers ------------------------------------------------------------------------

    def _w(self, s: str) -> None:
        self.out.write(s)
        self.out.flush()

    def _dim(self, s: str) -> str:
        return f"\x1b[2m{s}\x1b[0m" if self.color and s else s

    def note(self, s: str) -> None:
        """One line of client information (dimmed)."""
        self._w(self._dim(s) + "\n")

    # -- commands ------------------------------------------------------------------------------

    def command(self, line: str) -> bool:
        """Run a /command; False means quit."""
        name, _, arg = line[1:].strip().partition(" ")
        name, arg = name.lower(), arg.strip().lower()
        if name in ("quit", "exit", "q"):
            return False
        if name == "help":
            self._w(HELP + "\n")
        elif name == "effort":
            if arg in EFFORTS:
                self.effort = arg
                self.note(f"effort: {arg}")
            else:
                self.note(f"effort is {self.effort}; usage: /effort low|medium|high")
        elif name == "reset":
            self.previous_id = None
            self.note("history cleared: the next turn starts a new conversation")
        elif name == "history":
            if not self.turns:
                self.note("no turns yet")
            for i, t in enumerate(self.turns, 1):
                toks = f", {t.output_tokens} tokens" if t.output_tokens is not None else ""
                text = t.text if len(t.text) <= 50 else t.text[:47] + "..."
                self._w(f"{i:3d}. {t.response_id or '-'}  effort={t.effort}  "
                        f"previous={t.previous_id or '-'}  [{t.status}{toks}]  {text!r}\n")
        elif name == "tools":
            if arg in ("on", "off"):
                self.tools = arg == "on"
            self.note(f"tools: {'on (python, browser)' if self.tools else 'off'}"
                      + ("" if arg in ("on", "off") else "; usage: /tools on|off"))
        elif name == "reasoning":
            if arg in ("show", "hide"):
                self.show_reasoning = arg == "show"
            self.note(f"reasoning: {'shown' if self.show_reasoning else 'hidden'}"
                      + ("" if arg in ("show", "hide") else "; usage: /reasoning show|hide"))
        elif name == "max":
            if arg in ("off", "none", "0"):
                self.max_output_tokens = None
            elif arg.isdigit():
                self.max_output_tokens = int(arg)
            self.note(f"max output tokens: {self.max_output_tokens or 'server default'}")
        else:
            self.note(f"unknown command /{name}; /help lists them")
        return True

    # -- one turn ------------------------------------------------------------------------------

    def send(self, text: str) -> Turn:
        import openai

        turn = Turn(text=text, previous_id=self.previous_id, effort=self.effort)
        self.turns.append(turn)
        kwargs: dict[str, Any] = {"model": self.model, "input": text, "stream": True,
                                  "store": True, "reasoning": {"effort": self.effort}}
        if self.previous_id:
            kwargs["previous_response_id"] = self.previous_id
        if self.max_output_tokens:
            kwargs["max_output_tokens"] = self.max_output_tokens
        if self.tools:
            kwargs["tools"] = BUILTIN_TOOLS
        r = _Render(self)
        stream = None
        try:
            stream = self.client.responses.create(**kwargs)
            for ev in stream:
                r.event(ev, turn)
            r.finish()
        except KeyboardInterrupt:
            r.finish()
            turn.status = "interrupted"
            self._w("[interrupted]\n")
        except openai.APIError as exc:
            r.finish()
            turn.status = "error"
            self._w(f"error: {_error_message(exc)}\n")
        finally:
            if stream is not None:
                try:
                    stream.close()
                except Exception:  # noqa: BLE001 - closing a broken stream: nothing to do
                    pass
        if turn.status in ("completed", "incomplete") and turn.response_id:
            self.previous_id = turn.response_id  # stored: the next turn chains to it
        return turn

    # -- the loop ------------------------------------------------------------------------------

    def repl(self, read=input) -> int:  # noqa: ANN001 - a prompt -> line callable
        while True:
            try:
                line = read("you> ").strip()
            except EOFError:
                self._w("\n")
                return 0
            except KeyboardInterrupt:
                self._w("\n")
                continue
            if not line:
                continue
            try:
                if line.startswith("/"):
                    if not self.command(line):
                        return 0
                else:
                    self.send(line)
            except KeyboardInterrupt:  # between events, e.g. while printing
                self._w("\n[interrupted]\n")


class _Render:
    """Streams one response's events to the terminal."""

    def __init__(self, s: ChatSession) -> None:
        self.s = s
        self.mode: str | None = None  # "reasoning" | "answer" | None: what is being printed
        self.thought = 0  # reasoning deltas (about one per token)
        self.at_line_start = True
        self.noted: set[str] = set()
        self.t0 = time.perf_counter()

    def _w(self, s: str) -> None:
        if s:
            self.s._w(s)
            self.at_line_start = s.endswith("\n")

    def _newline(self) -> None:
        if not self.at_line_start:
            self._w("\n")

    def _end_reasoning(self) -> None:
        if self.mode != "reasoning":
            return
        self.mode = None
        if self.s.show_reasoning:
            self._newline()
        else:
            if self.s.color:
                self._w("\r\x1b[K")
            self._w(self.s._dim(f"[thought for {self.thought} tokens]") + "\n")

    def _reasoning(self, delta: str) -> None:
        if self.mode != "reasoning":
            self._end_answer()
            self.mode = "reasoning"
        self.thought += 1
        if self.s.show_reasoning:
            self._w(self.s._dim(delta))
        elif self.s.color and (self.thought == 1 or self.thought % 8 == 0):
            self._w(f"\r\x1b[2m[thinking... {self.thought} tokens]\x1b[0m")
            self.at_line_start = False

    def _answer(self, delta: str) -> None:
        if self.mode != "answer":
            self._end_reasoning()
            self._newline()
            self.mode = "answer"
        self._w(delta)

    def _end_answer(self) -> None:
        if self.mode == "answer":
            self.mode = None
            self._newline()

    def _tool_note(self, key: str, text: str) -> None:
        if key in self.noted:
            return
        self.noted.add(key)
        self._end_reasoning()
        self._end_answer()
        self._w(self.s._dim(text) + "\n")

    def event(self, ev: Any, turn: Turn) -> None:
        typ = getattr(ev, "type", "") or ""
        if typ == "response.reasoning_text.delta":
            self._reasoning(getattr(ev, "delta", "") or "")
        elif typ == "response.output_text.delta":
            self._answer(getattr(ev, "delta", "") or "")
        elif typ in ("response.created", "response.in_progress"):
            turn.response_id = getattr(ev.response, "id", None) or turn.response_id
        elif typ in ("response.completed", "response.incomplete", "response.failed"):
            resp = ev.response
            turn.response_id = getattr(resp, "id", None) or turn.response_id
            turn.status = getattr(resp, "status", None) or typ.rsplit(".", 1)[1]
            usage = getattr(resp, "usage", None)
            turn.output_tokens = getattr(usage, "output_tokens", None) if usage else None
            self.finish()
            if typ == "response.failed":
                err = getattr(resp, "error", None)
                self._w(f"error: {getattr(err, 'message', None) or 'the response failed'}\n")
            else:
                extra = ""
                if typ == "response.incomplete":
                    why = getattr(getattr(resp, "incomplete_details", None), "reason", None)
                    extra = f"incomplete: {why or 'unknown'}, "
                toks = turn.output_tokens
                self._w(self.s._dim(f"[{extra}{toks if toks is not None else '?'} tokens, "
                                    f"{time.perf_counter() - self.t0:.1f} s]") + "\n")
        elif typ == "error":
            self.finish()
            turn.status = "error"
            self._w(f"error: {getattr(ev, 'message', None) or 'stream error'}\n")
        elif typ in ("response.output_item.added", "response.output_item.done"):
            self._item(getattr(ev, "item", None), typ.endswith(".done"))
        elif typ.startswith("response.code_interpreter_call"):
            key = getattr(ev, "item_id", "") or ""
            if typ.endswith("code.done"):
                self._tool_note(key + ":code", "[python] code:\n" + _indent(
                    getattr(ev, "code", "") or ""))
            else:
                self._tool_note(key, "[python] running...")
        elif typ.startswith("response.web_search_call"):
            self._tool_note(getattr(ev, "item_id", "") or "", "[browser] searching...")

    def _item(self, item: Any, done: bool) -> None:
        kind = getattr(item, "type", None)
        key = getattr(item, "id", None) or ""
        if kind == "code_interpreter_call":
            self._tool_note(key, "[python] running...")
            if done:
                code = getattr(item, "code", None)
                if code:
                    self._tool_note(key + ":code", "[python] code:\n" + _indent(code))
                for o in getattr(item, "outputs", None) or []:
                    logs = getattr(o, "logs", None)
                    if logs:
                        self._tool_note(key + ":out", "[python] output:\n" + _indent(logs))
        elif kind == "web_search_call":
            self._tool_note(key, "[browser] searching...")
            if done:
                action = getattr(item, "action", None)
                what = (getattr(action, "query", None) or getattr(action, "url", None)
                        or getattr(action, "pattern", None)) if action else None
                if what:
                    self._tool_note(key + ":what", f"[browser] {getattr(action, 'type', '')}: "
                                                   f"{what}")
        elif kind == "function_call" and done:
            self._tool_note(key, f"[tool call] {getattr(item, 'name', '?')}"
                                 f"({getattr(item, 'arguments', '')})")

    def finish(self) -> None:
        self._end_reasoning()
        self._end_answer()
        self._newline()


def _indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in text.rstrip("\n").splitlines())


def _error_message(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    msg = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return re.sub(r"\s+", " ", str(msg))


# -- an in-process server ----------------------------------------------------------------------

def _start_local_server(model: str | None) -> tuple[str, Any]:
    """Serve `model` on a free loopback port in a daemon thread: (base url, uvicorn server)."""
    import logging
    import socket
    import threading

    import httpx
    import uvicorn

    from .serve import ServeOptions, build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = build_app(ServeOptions(model=model, port=port))
    # the server shares this terminal: keep its warnings (e.g. harmony recoveries of a random
    # model) from interleaving with the chat; errors still show
    logging.getLogger("ossrt").setLevel(logging.ERROR)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True, name="ossrt-chat-server")
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not thread.is_alive():
            raise OSError("the in-process server stopped while starting")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return url, server
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise OSError(f"the in-process server did not answer on {url} within 60 s")


def _base_url(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def _cmd_chat(args: argparse.Namespace) -> int:
    import openai

    try:
        import readline  # noqa: F401 - line editing and arrow-key history for input()
    except ImportError:
        pass
    if args.effort not in EFFORTS:
        print(f"ossrt chat: error: --effort must be one of {', '.join(EFFORTS)}", file=sys.stderr)
        return 2
    tools = [t.strip() for t in (args.tools or "").split(",") if t.strip()]
    bad = [t for t in tools if t not in ("python", "browser")]
    if bad:
        print(f"ossrt chat: error: unknown tool(s) {', '.join(bad)} (python, browser)",
              file=sys.stderr)
        return 2
    server = None
    url = args.url
    if not url:
        print("ossrt chat: starting a local server...", file=sys.stderr)
        url, server = _start_local_server(args.model)
    api_key = args.api_key or os.environ.get("OSSRT_API_KEY") or "none"
    client = openai.OpenAI(base_url=_base_url(url), api_key=api_key, max_retries=1)
    try:
        model = args.model_id
        if not model:
            try:
                ids = [m.id for m in client.models.list()]
            except openai.APIError as exc:
                print(f"ossrt chat: error: cannot list the models of {url}: "
                      f"{_error_message(exc)}", file=sys.stderr)
                return 1
            if not ids:
                print(f"ossrt chat: error: {url} serves no model", file=sys.stderr)
                return 1
            model = ids[0]
        session = ChatSession(client=client, model=model, effort=args.effort,
                              show_reasoning=not args.hide_reasoning, tools=bool(tools),
                              max_output_tokens=args.max_output_tokens,
                              color=not args.no_color and sys.stdout.isatty())
        print(f"ossrt chat: {model} at {url}; effort {session.effort}, tools "
              f"{'on' if session.tools else 'off'}. /help for commands, Ctrl-D to quit.")
        return session.repl()
    finally:
        if server is not None:
            server.should_exit = True


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat in the terminal (Responses API; a local server "
                                    "unless --url)")
    p.add_argument("--url", default=None, help="a running server, e.g. http://127.0.0.1:8000 "
                   "(default: serve --model in-process)")
    p.add_argument("--api-key", default=None, help="bearer key for --url (default: "
                   "$OSSRT_API_KEY)")
    p.add_argument("--model-id", default=None, help="model id to ask for (default: the first "
                   "of /v1/models)")
    p.add_argument("--model", default=None, help="without --url: checkpoint folder to serve "
                   "(default: as `ossrt serve`)")
    p.add_argument("--effort", default="medium", choices=EFFORTS, help="reasoning effort")
    p.add_argument("--hide-reasoning", action="store_true",
                   help="show '[thought for N tokens]' instead of the reasoning")
    p.add_argument("--no-color", action="store_true", help="no ANSI colors")
    p.add_argument("--tools", default=None, help="offer built-in tools: python,browser")
    p.add_argument("--max-output-tokens", type=int, default=None)
    p.set_defaults(func=_cmd_chat)
