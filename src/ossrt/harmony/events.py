"""Typed events of the Harmony completion parser, and its summary of a whole turn."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypeAlias

FinishReason: TypeAlias = Literal["stop", "tool_calls", "length"]


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    """Chain of thought (analysis channel)."""

    text: str


@dataclass(frozen=True, slots=True)
class TextDelta:
    """The answer (final channel)."""

    text: str


@dataclass(frozen=True, slots=True)
class PreambleDelta:
    """User-visible commentary without a recipient (said before calling tools)."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCallStart:
    """A message to a tool began. `name` is the clean recipient (`functions.get_weather`)."""

    index: int
    call_id: str
    name: str
    channel: str


@dataclass(frozen=True, slots=True)
class ToolCallArgsDelta:
    index: int
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallEnd:
    index: int


@dataclass(frozen=True, slots=True)
class MessageDone:
    """One Harmony message ended (by a terminator, a new header, or the end of the stream)."""

    channel: str
    recipient: str | None


Event: TypeAlias = (ReasoningDelta | TextDelta | PreambleDelta | ToolCallStart
                    | ToolCallArgsDelta | ToolCallEnd | MessageDone)


@dataclass(frozen=True, slots=True)
class Recovery:
    """A malformed spot the parser recovered from. `reason` is a short stable code."""

    reason: str
    detail: str
    token_index: int


@dataclass(frozen=True, slots=True)
class ParsedToolCall:
    index: int
    call_id: str
    name: str
    arguments: str
    channel: str

    @property
    def namespace(self) -> str | None:
        """`functions` for `functions.get_weather`; None for a bare name such as `python`."""
        namespace, dot, _ = self.name.partition(".")
        return namespace if dot else None

    @property
    def function_name(self) -> str:
        """`get_weather` for `functions.get_weather`; the whole name when it has no namespace."""
        return self.name.partition(".")[2] or self.name


@dataclass(frozen=True, slots=True)
class ParsedMessage:
    """One message of the turn, in order: what a Responses API output item is made from."""

    channel: str
    recipient: str | None
    text: str


@dataclass(frozen=True, slots=True)
class ParsedTurn:
    """Everything the model said in one completion. Texts equal their deltas concatenated."""

    reasoning: str
    text: str
    preambles: tuple[str, ...]
    tool_calls: tuple[ParsedToolCall, ...]
    messages: tuple[ParsedMessage, ...]
    finish: FinishReason
    recoveries: tuple[Recovery, ...]
