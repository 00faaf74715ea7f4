"""Streaming parser: completion token ids (what follows `<|start|>assistant`) -> typed events.

A small state machine over Harmony's special tokens; headers are decoded as text and parsed
leniently (`header.py`). It never raises to its caller, never puts special-token text into
content or a tool name, and never drops answer text: every malformed spot is recovered from,
recorded in `recoveries` with a reason and logged as one warning line.

    parser = HarmonyStreamParser()
    for token in completion:
        events = parser.feed(token)
    events = parser.finish("length")   # the reason used if the turn did not end cleanly
    turn = parser.turn
"""

from __future__ import annotations

import codecs
import logging
import uuid
from collections.abc import Callable, Iterable
from typing import Literal

from openai_harmony import HarmonyEncoding

from .events import (
    Event,
    FinishReason,
    MessageDone,
    ParsedMessage,
    ParsedToolCall,
    ParsedTurn,
    PreambleDelta,
    ReasoningDelta,
    Recovery,
    TextDelta,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
)
from .header import PartKind, parse_header
from .tokenizer import (
    CALL, CHANNEL, CONSTRAIN, END, ENDOFTEXT, MESSAGE, RETURN, START, STARTOFTEXT, get_tokenizer)

logger = logging.getLogger(__name__)

# A header longer than this (tokens or words), or holding a newline, is content in disguise:
# no well-formed header comes close (`assistant to=functions.f<|channel|>commentary json`).
MAX_HEADER_TOKENS = 48
MAX_HEADER_WORDS = 6

_State = Literal["header", "content", "between"]
_DELTAS = {"analysis": ReasoningDelta, "commentary": PreambleDelta, "final": TextDelta}


def _new_decoder() -> codecs.IncrementalDecoder:
    return codecs.getincrementaldecoder("utf-8")(errors="replace")


def default_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class _Message:
    """The message being streamed."""

    def __init__(self, channel: str, recipient: str | None, decoder: codecs.IncrementalDecoder,
                 tool_index: int | None) -> None:
        self.channel, self.recipient, self.decoder = channel, recipient, decoder
        self.tool_index = tool_index
        self.chunks: list[str] = []

    def delta(self, text: str) -> list[Event]:
        if not text:
            return []
        self.chunks.append(text)
        if self.tool_index is not None:
            return [ToolCallArgsDelta(self.tool_index, text)]
        return [_DELTAS.get(self.channel, TextDelta)(text)]


class HarmonyStreamParser:
    """Feed completion tokens one at a time; see the module docstring."""

    def __init__(self, encoding: HarmonyEncoding | None = None, *,
                 call_id_factory: Callable[[], str] = default_call_id) -> None:
        self._encoding = encoding or get_tokenizer().encoding
        self._new_call_id = call_id_factory
        self._state: _State = "header"
        self._role_known = True  # the prompt ended with <|start|>assistant
        self._parts: list[tuple[PartKind, bytearray]] = [("role", bytearray())]
        self._header_tokens = 0
        self._msg: _Message | None = None
        self._ended_by: int | None = None  # RETURN or CALL once the turn ended cleanly
        self._index = -1
        self._finish: FinishReason | None = None
        self.messages: list[ParsedMessage] = []
        self.tool_calls: list[ParsedToolCall] = []
        self.recoveries: list[Recovery] = []

    # -- public ------------------------------------------------------------------------------

    def feed(self, token: int) -> list[Event]:
        """Events produced by one more completion token."""
        self._index += 1
        try:
            return self._feed(token)
        except Exception as exc:  # a bug here must not kill the request: record, reset, go on
            logger.exception("harmony parser failed on token %d at %d", token, self._index)
            self._recover("internal_error", repr(exc))
            self._state, self._msg = "between", None
            return []

    def feed_many(self, tokens: Iterable[int]) -> list[Event]:
        return [event for token in tokens for event in self.feed(token)]

    def finish(self, reason_if_cut: FinishReason = "length") -> list[Event]:
        """End of the completion. The finish reason is `tool_calls` after `<|call|>`, `stop`
        after `<|return|>`, else `reason_if_cut` (the stream stopped mid-turn)."""
        if self._finish is not None:
            return []
        try:
            events = self._finish_stream()
        except Exception as exc:
            logger.exception("harmony parser failed at the end of the stream")
            self._recover("internal_error", repr(exc))
            events = []
        if self._ended_by == CALL and self.tool_calls:
            self._finish = "tool_calls"
        elif self._ended_by is not None:
            self._finish = "stop"
        else:
            self._finish = reason_if_cut
        return events

    @property
    def current_channel(self) -> str | None:
        """The channel whose content the next token belongs to, if inside a message body."""
        return self._msg.channel if self._state == "content" and self._msg is not None else None

    @property
    def turn(self) -> ParsedTurn:
        """The summary so far (complete after `finish`)."""
        by_channel = {c: "".join(m.text for m in self.messages
                                 if m.channel == c and m.recipient is None)
                      for c in ("analysis", "final")}
        return ParsedTurn(
            reasoning=by_channel["analysis"], text=by_channel["final"],
            preambles=tuple(m.text for m in self.messages
                            if m.channel == "commentary" and m.recipient is None),
            tool_calls=tuple(self.tool_calls), messages=tuple(self.messages),
            finish=self._finish or "length", recoveries=tuple(self.recoveries))

    # -- state machine -----------------------------------------------------------------------

    def _feed(self, token: int) -> list[Event]:
        if self._ended_by is not None:  # the caller did not stop: a new message may follow
            if token != START:
                self._recover("tokens_after_stop", f"token {token} after the turn ended")
            self._ended_by = None
        if token < STARTOFTEXT:
            return self._text(token)
        if self._state == "header":
            return self._header_special(token)
        if self._state == "content":
            return self._content_special(token)
        return self._between_special(token)

    def _text(self, token: int) -> list[Event]:
        data = self._token_bytes(token)
        if self._state == "content":
            assert self._msg is not None
            return self._msg.delta(self._msg.decoder.decode(data))
        if self._state == "between":
            if not data.strip():
                return []  # whitespace between messages
            self._recover("missing_start", "text after a message without <|start|>")
            self._begin_header(role_known=True)
        self._parts[-1][1].extend(data)
        self._header_tokens += 1
        if self._header_overflows():
            self._recover("missing_message", "header ran into content without <|message|>")
            return self._open_from_header(complete=False)
        return []

    def _header_special(self, token: int) -> list[Event]:
        if token == CHANNEL:
            self._parts.append(("channel", bytearray()))
        elif token == CONSTRAIN:
            self._parts.append(("constrain", bytearray()))
        elif token == MESSAGE:
            return self._open_from_header(complete=True)
        elif token == START:
            if len(self._parts) == 1 and not self._parts[0][1]:
                self._begin_header(role_known=False)  # `<|start|>assistant` said once more
                return []
            self._recover("header_interrupted", "<|start|> inside a header")
            events = self._close_partial_header()
            self._begin_header(role_known=False)
            return events
        elif token in (END, RETURN, CALL, ENDOFTEXT):
            self._recover("missing_message", "message ended inside its header")
            events = self._close_partial_header()
            if token != END:
                self._between_special(token)
            return events
        else:
            self._stray(token)
        return []

    def _content_special(self, token: int) -> list[Event]:
        msg = self._msg
        assert msg is not None
        if token == END:
            if msg.recipient is not None:
                self._recover("call_ended_by_end", f"call to {msg.recipient} ended by <|end|>")
            elif msg.channel == "final":
                self._recover("end_after_final", "final message ended by <|end|>")
            return self._close()
        if token in (RETURN, ENDOFTEXT):
            if token == ENDOFTEXT:
                self._recover("endoftext", "<|endoftext|> ended the turn")
            elif msg.recipient is not None:
                self._recover("call_ended_by_return", f"call to {msg.recipient} ended by "
                              "<|return|>")
            elif msg.channel != "final":
                self._recover("return_without_final", f"<|return|> after {msg.channel}")
            self._ended_by = CALL if msg.recipient is not None else RETURN
            return self._close()
        if token == CALL:
            if msg.recipient is None:
                self._recover("call_without_recipient", f"<|call|> after {msg.channel} text")
            self._ended_by = CALL if msg.recipient is not None else RETURN
            return self._close()
        if token in (START, CHANNEL):
            self._recover("missing_end", "a new header began inside a message")
            events = self._close()
            self._begin_header(role_known=token == CHANNEL)
            if token == CHANNEL:
                self._parts.append(("channel", bytearray()))
            return events
        self._stray(token)
        return []

    def _between_special(self, token: int) -> list[Event]:
        if token == START:
            self._begin_header(role_known=False)
        elif token in (CHANNEL, MESSAGE):
            self._recover("missing_start", "a header began without <|start|>")
            self._begin_header(role_known=True)
            if token == MESSAGE:
                return self._open_from_header(complete=True)
            self._parts.append(("channel", bytearray()))
        elif token in (RETURN, ENDOFTEXT):
            self._ended_by = RETURN
        elif token == CALL and self.messages and self.messages[-1].recipient is not None:
            self._ended_by = CALL
        else:
            self._stray(token)
        return []

    # -- headers and messages ----------------------------------------------------------------

    def _begin_header(self, *, role_known: bool) -> None:
        self._state, self._role_known = "header", role_known
        self._parts = [("role", bytearray())]
        self._header_tokens = 0

    def _header_overflows(self) -> bool:
        if self._header_tokens > MAX_HEADER_TOKENS:
            return True
        text = b" ".join(data for _, data in self._parts).decode("utf-8", "ignore").strip()
        return "\n" in text or len(text.split()) > MAX_HEADER_WORDS

    def _decode_parts(self) -> tuple[list[tuple[PartKind, str]], codecs.IncrementalDecoder]:
        """The header parts as text; the last part's incomplete UTF-8 tail stays in the
        returned decoder, which goes on decoding the content."""
        parts: list[tuple[PartKind, str]] = []
        decoder = _new_decoder()
        for i, (kind, data) in enumerate(self._parts):
            if i < len(self._parts) - 1:
                parts.append((kind, bytes(data).decode("utf-8", "replace")))
            else:
                parts.append((kind, decoder.decode(bytes(data))))
        return parts, decoder

    def _open_from_header(self, *, complete: bool) -> list[Event]:
        parts, decoder = self._decode_parts()
        header = parse_header(parts, role_known=self._role_known, complete=complete)
        for reason, detail in header.issues:
            self._recover(reason, detail)
        tool_index = None
        events: list[Event] = []
        if header.recipient is not None:
            tool_index = len(self.tool_calls)
            call_id = self._new_call_id()
            self.tool_calls.append(ParsedToolCall(tool_index, call_id, header.recipient, "",
                                                  header.channel))
            events.append(ToolCallStart(tool_index, call_id, header.recipient, header.channel))
        self._msg = _Message(header.channel, header.recipient, decoder, tool_index)
        self._state = "content"
        return events + self._msg.delta(header.content)

    def _close_partial_header(self) -> list[Event]:
        """A header cut short (by <|start|> or the end of the stream): keep any text in it."""
        parts, _ = self._decode_parts()
        header = parse_header(parts, role_known=self._role_known, complete=False)
        if not header.content.strip():  # nothing said yet (a tool name may be cut short)
            self._state = "between"
            return []
        return self._open_from_header(complete=False) + self._close()

    def _close(self) -> list[Event]:
        msg = self._msg
        assert msg is not None
        events = msg.delta(msg.decoder.decode(b"", final=False))
        if msg.decoder.getstate()[0]:
            self._recover("incomplete_utf8", "a message ended inside a UTF-8 character")
        text = "".join(msg.chunks)
        self.messages.append(ParsedMessage(msg.channel, msg.recipient, text))
        if msg.tool_index is not None:
            call = self.tool_calls[msg.tool_index]
            self.tool_calls[msg.tool_index] = ParsedToolCall(
                call.index, call.call_id, call.name, text, call.channel)
            events.append(ToolCallEnd(msg.tool_index))
        events.append(MessageDone(msg.channel, msg.recipient))
        self._msg, self._state = None, "between"
        return events

    def _finish_stream(self) -> list[Event]:
        if self._state == "content":
            return self._close()
        if self._state == "header" and any(data for _, data in self._parts):
            self._recover("cut_in_header", "the stream ended inside a header")
            return self._close_partial_header()
        return []

    # -- helpers -----------------------------------------------------------------------------

    def _token_bytes(self, token: int) -> bytes:
        return bytes(self._encoding._inner.decode_bytes([token]))  # noqa: SLF001

    def _stray(self, token: int) -> None:
        self._recover("stray_special", f"special token {token} ignored in {self._state}")

    def _recover(self, reason: str, detail: str) -> None:
        self.recoveries.append(Recovery(reason, detail, self._index))
        logger.warning("harmony recovery at token %d: %s (%s)", self._index, reason, detail)


def parse_completion(tokens: Iterable[int], reason_if_cut: FinishReason = "length", *,
                     encoding: HarmonyEncoding | None = None,
                     call_id_factory: Callable[[], str] = default_call_id) -> ParsedTurn:
    """Parse a whole completion at once."""
    parser = HarmonyStreamParser(encoding, call_id_factory=call_id_factory)
    parser.feed_many(tokens)
    parser.finish(reason_if_cut)
    return parser.turn
