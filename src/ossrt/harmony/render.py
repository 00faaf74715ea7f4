"""Conversation -> prompt token ids, rendered by openai-harmony (we only map, never format).

Two deliberate choices, both checked by tests/test_harmony_render.py:
- Chain of thought (SPEC 4): reasoning of assistant turns before the last user message is
  dropped; reasoning after it (the tool-call loop still running) is kept. openai-harmony's own
  `auto_drop_analysis` is not that rule (it drops analysis only before the *first* final
  message, and only when the last assistant message is final), so we drop ourselves and
  render with `auto_drop_analysis=False`.
- Tool calls are `Message.with_recipient(...)`, which openai-harmony renders recipient-first:
  `<|start|>assistant to=functions.f<|channel|>commentary <|constrain|>json<|message|>{..}<|call|>`.
  The model itself may write the recipient after the channel; both are valid Harmony.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    Message,
    ReasoningEffort,
    RenderConversationConfig,
    Role,
    SystemContent,
    TextContent,
    ToolDescription,
)

from .conversation import (
    AssistantMessage,
    ChatMessage,
    FunctionTool,
    InstructionsMessage,
    ReasoningEffortName,
    ResponseFormat,
    ToolCall,
    ToolResult,
    UserMessage,
)
from .tokenizer import CALL, RETURN, get_tokenizer

# Sampling stops: end of answer and tool call. Never <|end|>: it separates the model's own
# messages within a turn (SPEC 4).
STOP_TOKEN_IDS: tuple[int, ...] = (RETURN, CALL)

TOOL_CALL_CONTENT_TYPE = "<|constrain|>json"

_EFFORTS: dict[str, ReasoningEffort] = {
    "low": ReasoningEffort.LOW, "medium": ReasoningEffort.MEDIUM, "high": ReasoningEffort.HIGH}


def build_system(reasoning_effort: ReasoningEffortName = "medium",
                 current_date: str | None = None,
                 builtin_tools: Sequence[str] = ()) -> Message:
    """Identity, knowledge cutoff 2024-06, date, `Reasoning:`, channels, built-in tools."""
    if reasoning_effort not in _EFFORTS:
        raise ValueError(f"reasoning_effort must be low, medium or high, not {reasoning_effort!r}")
    content = SystemContent.new().with_reasoning_effort(_EFFORTS[reasoning_effort])
    if current_date:
        content = content.with_conversation_start_date(current_date)
    for name in builtin_tools:
        if name == "browser":
            content = content.with_browser_tool()
        elif name == "python":
            content = content.with_python_tool()
        else:
            raise ValueError(f"unknown built-in tool {name!r} (known: browser, python)")
    return Message.from_role_and_content(Role.SYSTEM, content)


def response_format_section(fmt: ResponseFormat) -> str:
    """The developer message's `# Response Formats` section (harmony docs/format.md)."""
    lines = ["# Response Formats", "", f"## {fmt.name}", ""]
    if fmt.description:
        lines.append(f"// {fmt.description}")
    lines.append(json.dumps(fmt.schema, ensure_ascii=False, separators=(",", ":")))
    return "\n".join(lines)


def build_developer(instructions: str | None,
                    function_tools: Sequence[FunctionTool] = (),
                    response_format: ResponseFormat | None = None) -> Message | None:
    """Instructions, function tools as `namespace functions`, response format; None if empty."""
    if not instructions and not function_tools and response_format is None:
        return None
    content = DeveloperContent.new()
    if instructions:
        content = content.with_instructions(instructions)
    if function_tools:
        content = content.with_function_tools([
            ToolDescription.new(t.name, t.description,
                                None if t.parameters is None else dict(t.parameters))
            for t in function_tools])
    message = Message.from_role_and_content(Role.DEVELOPER, content)
    if response_format is not None:
        sep = "\n\n" if instructions or function_tools else ""
        message = message.adding_content(TextContent(text=sep + response_format_section(
            response_format)))
    return message


def merged_instructions(instructions: str | None, messages: Sequence[ChatMessage]) -> str | None:
    """The request's instructions, then every system/developer message's text, in order."""
    parts = [instructions] if instructions else []
    parts += [m.text for m in messages if isinstance(m, InstructionsMessage) and m.text]
    return "\n\n".join(parts) or None


def _assistant_messages(msg: AssistantMessage, keep_reasoning: bool) -> list[Message]:
    out: list[Message] = []
    if msg.reasoning and keep_reasoning:
        out.append(Message.from_role_and_content(Role.ASSISTANT, msg.reasoning)
                   .with_channel("analysis"))
    if msg.tool_calls:
        if msg.text:
            out.append(Message.from_role_and_content(Role.ASSISTANT, msg.text)
                       .with_channel("commentary"))
        out += [Message.from_role_and_content(Role.ASSISTANT, call.arguments)
                .with_channel(call.channel).with_recipient(call.recipient)
                .with_content_type(TOOL_CALL_CONTENT_TYPE if call.namespace == "functions"
                                   else "code") for call in msg.tool_calls]
    elif msg.text is not None or not msg.reasoning:
        out.append(Message.from_role_and_content(Role.ASSISTANT, msg.text or "")
                   .with_channel("final"))
    return out


def _tool_result_message(result: ToolResult, calls: dict[str, ToolCall]) -> Message:
    call = calls.get(result.call_id)
    if call is not None:
        recipient, channel = call.recipient, call.channel
    elif result.name:
        recipient = result.name if "." in result.name else f"functions.{result.name}"
        channel = "commentary"
    else:
        raise ValueError(f"tool result {result.call_id!r} matches no earlier tool call "
                         "and names no tool")
    return (Message.from_author_and_content(Author.new(Role.TOOL, recipient), result.output)
            .with_recipient("assistant").with_channel(channel))


def build_conversation(messages: Sequence[ChatMessage], *,
                       reasoning_effort: ReasoningEffortName = "medium",
                       tools: Sequence[FunctionTool] = (),
                       instructions: str | None = None,
                       current_date: str | None = None,
                       builtin_tools: Sequence[str] = (),
                       response_format: ResponseFormat | None = None) -> Conversation:
    """The openai-harmony Conversation for `messages`, chain of thought already dropped."""
    out = [build_system(reasoning_effort, current_date, builtin_tools)]
    developer = build_developer(merged_instructions(instructions, messages), tools,
                                response_format)
    if developer is not None:
        out.append(developer)
    last_user = max((i for i, m in enumerate(messages) if isinstance(m, UserMessage)),
                    default=-1)
    calls: dict[str, ToolCall] = {}
    for i, msg in enumerate(messages):
        if isinstance(msg, UserMessage):
            out.append(Message.from_role_and_content(Role.USER, msg.text))
        elif isinstance(msg, AssistantMessage):
            out += _assistant_messages(msg, keep_reasoning=i > last_user)
            calls.update((c.call_id, c) for c in msg.tool_calls)
        elif isinstance(msg, ToolResult):
            out.append(_tool_result_message(msg, calls))
        # InstructionsMessage: already merged into the developer message.
    return Conversation.from_messages(out)


def render_prompt(messages: Sequence[ChatMessage], *,
                  reasoning_effort: ReasoningEffortName = "medium",
                  tools: Sequence[FunctionTool] = (),
                  instructions: str | None = None,
                  current_date: str | None = None,
                  builtin_tools: Sequence[str] = (),
                  response_format: ResponseFormat | None = None) -> list[int]:
    """Prompt token ids for the next assistant turn (they end with `<|start|>assistant`)."""
    conversation = build_conversation(
        messages, reasoning_effort=reasoning_effort, tools=tools, instructions=instructions,
        current_date=current_date, builtin_tools=builtin_tools, response_format=response_format)
    return get_tokenizer().encoding.render_conversation_for_completion(
        conversation, Role.ASSISTANT, RenderConversationConfig(auto_drop_analysis=False))


def render_tool_result(recipient: str, channel: str, output: str) -> list[int]:
    """Tokens that continue a turn after the model's `<|call|>` to a built-in tool: the tool's
    message (`<|start|>{recipient} to=assistant<|channel|>{channel}<|message|>...<|end|>`), then
    `<|start|>assistant` for the model to go on. Appending these to the prompt and the tokens
    the model generated gives exactly the prompt a re-render would, without re-rendering."""
    message = (Message.from_author_and_content(Author.new(Role.TOOL, recipient), output)
               .with_recipient("assistant").with_channel(channel))
    tok = get_tokenizer()
    return list(tok.encoding.render(message)) + tok.encode("<|start|>assistant",
                                                           allow_special=True)
