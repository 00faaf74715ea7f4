"""Parser events -> Responses API stream events and output items.

One `OutputBuilder` per response, across every round of its built-in tool loop: reasoning,
messages and function calls as before; a call to a built-in tool (`browser.*` -> a
`web_search_call` item, `python` -> a `code_interpreter_call` item) stays pending when the
model's message ends, until the server has run it (`begin_builtin` / `finish_builtin`).
Events carry no sequence numbers (the route adds them).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

from ..harmony import (MessageDone, PreambleDelta, ReasoningDelta, TextDelta, ToolCallArgsDelta,
                       ToolCallStart)

# text -> its url_citation annotations ({"type", "start_index", "end_index", "url", "title"})
Annotator = Callable[[str], list[dict[str, Any]]]


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def builtin_kind(recipient: str, enabled: frozenset[str]) -> str | None:
    """The output item type for a call to `recipient`, if it is an enabled built-in tool."""
    if recipient == "python" and "python" in enabled:
        return "code_interpreter_call"
    if recipient.startswith("browser.") and "browser" in enabled:
        return "web_search_call"
    return None


class OutputBuilder:
    def __init__(self, builtins: frozenset[str] = frozenset(),
                 annotate: Annotator | None = None) -> None:
        self.output: list[dict[str, Any]] = []
        self.builtins, self.annotate = builtins, annotate
        self.pending: dict[str, Any] | None = None  # a built-in call waiting to be run
        self.transcript: dict[str, dict[str, str]] = {}  # built-in item id -> what the model saw
        self._cur: dict[str, Any] | None = None
        self._kind: str | None = None  # reasoning | message | function_call | builtin | skip
        self._chunks: list[str] = []
        self.status = "completed"  # what closing items get; "incomplete" for a cut turn

    def feed(self, ev: Any) -> list[dict[str, Any]]:
        if isinstance(ev, ReasoningDelta):
            return self._delta("reasoning", ev.text)
        if isinstance(ev, (TextDelta, PreambleDelta)):
            return self._delta("message", ev.text)
        if isinstance(ev, ToolCallStart):
            out = self.close()
            kind = builtin_kind(ev.name, self.builtins)
            if kind is not None:
                return out + self._open(kind, recipient=ev.name, channel=ev.channel)
            if not ev.name.startswith("functions."):  # a tool this request did not enable
                self._kind = "skip"
                return out
            return out + self._open("function_call", call_id=ev.call_id,
                                    name=ev.name.removeprefix("functions."))
        if isinstance(ev, ToolCallArgsDelta):
            if self._kind not in ("function_call", "code_interpreter_call",
                                  "web_search_call") or not ev.text:
                return []
            self._chunks.append(ev.text)
            if self._kind == "function_call":
                return [self._ev("response.function_call_arguments.delta", delta=ev.text)]
            if self._kind == "code_interpreter_call":
                return [self._ev("response.code_interpreter_call_code.delta", delta=ev.text)]
            return []
        if isinstance(ev, MessageDone):
            return self.close()
        return []

    def _ev(self, type_: str, item: dict[str, Any] | None = None, **fields: Any
            ) -> dict[str, Any]:
        item = item or self._cur
        assert item is not None
        return {"type": type_, "item_id": item["id"], "output_index": item["_index"], **fields}

    def _delta(self, kind: str, text: str) -> list[dict[str, Any]]:
        out = [] if self._kind == kind else self.close() + self._open(kind)
        if not text:
            return out
        self._chunks.append(text)
        name = "response.reasoning_text.delta" if kind == "reasoning" else (
            "response.output_text.delta")
        extra = {} if kind == "reasoning" else {"logprobs": []}
        return out + [self._ev(name, content_index=0, delta=text, **extra)]

    def _open(self, kind: str, **fields: Any) -> list[dict[str, Any]]:
        self._kind, self._chunks = kind, []
        index = len(self.output)
        if kind == "reasoning":
            self._cur = {"id": new_id("rs"), "type": "reasoning", "summary": [], "content": []}
            part: dict[str, Any] | None = {"type": "reasoning_text", "text": ""}
        elif kind == "message":
            self._cur = {"id": new_id("msg"), "type": "message", "role": "assistant",
                         "status": "in_progress", "content": []}
            part = {"type": "output_text", "text": "", "annotations": []}
        elif kind == "function_call":
            self._cur = {"id": new_id("fc"), "type": "function_call", "status": "in_progress",
                         "arguments": "", **fields}
            part = None
        elif kind == "code_interpreter_call":
            self._cur = {"id": new_id("ci"), "type": "code_interpreter_call",
                         "status": "in_progress", "code": "", "container_id": "cntr_local",
                         "outputs": None}
            part = None
        else:  # web_search_call
            self._cur = {"id": new_id("ws"), "type": "web_search_call", "status": "in_progress",
                         "action": {"type": "search", "query": ""}}
            part = None
        self._cur["_index"] = index
        if kind in ("code_interpreter_call", "web_search_call"):
            self.transcript[self._cur["id"]] = {"recipient": fields["recipient"],
                                                "channel": fields["channel"]}
        out = [{"type": "response.output_item.added", "output_index": index,
                "item": _public(self._cur)}]
        if part is not None:
            out.append(self._ev("response.content_part.added", content_index=0, part=part))
        elif kind == "code_interpreter_call":
            out.append(self._ev("response.code_interpreter_call.in_progress"))
        elif kind == "web_search_call":
            out.append(self._ev("response.web_search_call.in_progress"))
        return out

    def close(self) -> list[dict[str, Any]]:
        """Ends the open item (if any): its done events; the item joins `output`. A built-in
        call instead becomes `pending` (its done events come from `finish_builtin`)."""
        kind, item = self._kind, self._cur
        self._kind, self._cur = None, None
        if item is None or kind is None:
            return []
        text = "".join(self._chunks)
        out: list[dict[str, Any]] = []
        if kind == "reasoning":
            part = {"type": "reasoning_text", "text": text}
            item["content"] = [part]
            out = [self._ev("response.reasoning_text.done", item, content_index=0, text=text),
                   self._ev("response.content_part.done", item, content_index=0, part=part)]
        elif kind == "message":
            notes = self.annotate(text) if self.annotate and text else []
            part = {"type": "output_text", "text": text, "annotations": notes}
            item["content"], item["status"] = [part], self.status
            out = [self._ev("response.output_text.annotation.added", item, content_index=0,
                            annotation_index=i, annotation=a) for i, a in enumerate(notes)]
            out += [self._ev("response.output_text.done", item, content_index=0, text=text,
                             logprobs=[]),
                    self._ev("response.content_part.done", item, content_index=0, part=part)]
        elif kind == "function_call":
            item["arguments"], item["status"] = text, self.status
            out = [self._ev("response.function_call_arguments.done", item, arguments=text)]
        else:  # a built-in call: run by the server before its item is done
            self.transcript[item["id"]]["arguments"] = text
            if kind == "code_interpreter_call":
                item["code"] = text
                out = [self._ev("response.code_interpreter_call_code.done", item, code=text)]
            else:
                item["action"] = _search_action(self.transcript[item["id"]]["recipient"], text)
            self.output.append(item)
            self.pending = item
            return out
        out.append({"type": "response.output_item.done", "output_index": item["_index"],
                    "item": _public(item)})
        self.output.append(item)
        return out

    # -- built-in tool calls --------------------------------------------------------------
    def pending_call(self) -> tuple[str, str, str] | None:
        """(recipient, channel, arguments) of the built-in call waiting to be run."""
        if self.pending is None:
            return None
        t = self.transcript[self.pending["id"]]
        return t["recipient"], t["channel"], t.get("arguments", "")

    def begin_builtin(self) -> list[dict[str, Any]]:
        item = self.pending
        assert item is not None
        if item["type"] == "code_interpreter_call":
            item["status"] = "interpreting"
            return [self._ev("response.code_interpreter_call.interpreting", item)]
        item["status"] = "searching"
        return [self._ev("response.web_search_call.searching", item)]

    def finish_builtin(self, output_text: str | None, ok: bool, sources: list[str] = (),
                       url: str | None = None, status: str | None = None
                       ) -> list[dict[str, Any]]:
        """Completes the pending call with what the tool returned (None: it never ran, e.g.
        the response ended first); `sources` / `url` fill a web search item's action."""
        item, self.pending = self.pending, None
        assert item is not None
        item["status"] = status or ("completed" if ok else "failed")
        if output_text is not None:
            self.transcript[item["id"]]["output"] = output_text
        out: list[dict[str, Any]] = []
        if item["type"] == "code_interpreter_call":
            item["outputs"] = None if output_text is None else [
                {"type": "logs", "logs": output_text}]
            if item["status"] == "completed":
                out.append(self._ev("response.code_interpreter_call.completed", item))
        else:
            action = item["action"]
            if action["type"] == "search" and sources:
                action["sources"] = [{"type": "url", "url": u} for u in sources]
            if action["type"] in ("open_page", "find_in_page") and url:
                action["url"] = url
            if item["status"] == "completed":
                out.append(self._ev("response.web_search_call.completed", item))
        out.append({"type": "response.output_item.done", "output_index": item["_index"],
                    "item": _public(item)})
        return out

    def public_output(self) -> list[dict[str, Any]]:
        return [_public(item) for item in self.output]


def _public(item: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in item.items() if not k.startswith("_")}


def _search_action(recipient: str, arguments: str) -> dict[str, Any]:
    """A web_search_call's `action` from the model's browser call (its arguments are the
    model's JSON, possibly malformed: missing fields become empty)."""
    try:
        args = json.loads(arguments)
    except ValueError:
        args = {}
    if not isinstance(args, dict):
        args = {}
    fn = recipient.partition(".")[2]
    if fn == "find":
        return {"type": "find_in_page", "pattern": str(args.get("pattern", "")), "url": ""}
    if fn == "open":
        target = args.get("id")
        return {"type": "open_page", "url": target if isinstance(target, str) else None}
    return {"type": "search", "query": str(args.get("query", ""))}
