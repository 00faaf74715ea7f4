"""The neutral conversation model: what both OpenAI APIs (Chat Completions, Responses) can say.

The HTTP layer maps its request onto these frozen dataclasses; `render.py` maps them onto
Harmony. Nothing here knows about tokens or HTTP.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

ReasoningEffortName: TypeAlias = Literal["low", "medium", "high"]
BuiltinToolName: TypeAlias = Literal["browser", "python"]


@dataclass(frozen=True, slots=True)
class FunctionTool:
    """A function the model may call, rendered in the developer message's `namespace functions`.

    `parameters` is a JSON Schema object; it is handed to openai-harmony unchanged.
    """

    name: str
    description: str = ""
    parameters: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """A structured-output schema, rendered as the developer message's `# Response Formats`."""

    name: str
    schema: Mapping[str, Any]
    description: str | None = None


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One call the assistant made. The Harmony recipient is `namespace.name` (`functions.f`).

    Function tools use the default namespace; built-in tools are e.g.
    `ToolCall(id, "search", args, namespace="browser", channel="analysis")` or
    `ToolCall(id, "python", code, namespace=None, channel="analysis")`.
    """

    call_id: str
    name: str
    arguments: str
    namespace: str | None = "functions"
    channel: str = "commentary"

    @property
    def recipient(self) -> str:
        return f"{self.namespace}.{self.name}" if self.namespace else self.name


@dataclass(frozen=True, slots=True)
class InstructionsMessage:
    """A system or developer message of an API request: both become the developer instructions."""

    text: str
    role: Literal["system", "developer"] = "developer"


@dataclass(frozen=True, slots=True)
class UserMessage:
    text: str


@dataclass(frozen=True, slots=True)
class AssistantMessage:
    """One assistant turn (or part of one): reasoning, then text, then tool calls.

    `text` is the final answer when there are no tool calls; alongside tool calls it is the
    preamble the model wrote before calling (commentary channel), since a final answer ends
    a turn and never precedes a call.
    """

    text: str | None = None
    reasoning: str | None = None
    tool_calls: tuple[ToolCall, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class ToolResult:
    """The output of a tool call. `name` may be omitted: it is looked up by `call_id`."""

    call_id: str
    output: str
    name: str | None = None


ChatMessage: TypeAlias = InstructionsMessage | UserMessage | AssistantMessage | ToolResult


def split_recipient(recipient: str) -> tuple[str | None, str]:
    """`functions.get_weather` -> (`functions`, `get_weather`); `python` -> (None, `python`)."""
    namespace, dot, name = recipient.partition(".")
    return (namespace, name) if dot else (None, recipient)
