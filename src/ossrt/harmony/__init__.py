"""Text and chat format: the o200k_harmony tokenizer, Harmony prompts and completion parsing."""

from .conversation import (
    AssistantMessage,
    BuiltinToolName,
    ChatMessage,
    FunctionTool,
    InstructionsMessage,
    ReasoningEffortName,
    ResponseFormat,
    ToolCall,
    ToolResult,
    UserMessage,
    split_recipient,
)
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
from .parser import HarmonyStreamParser, parse_completion
from .render import (
    STOP_TOKEN_IDS,
    build_conversation,
    build_developer,
    build_system,
    render_prompt,
    render_tool_result,
    response_format_section,
)
from .tokenizer import HarmonyTokenizer, VocabError, get_tokenizer, vocab_dir

__all__ = [
    "AssistantMessage", "BuiltinToolName", "ChatMessage", "Event", "FinishReason",
    "FunctionTool", "HarmonyStreamParser", "HarmonyTokenizer", "InstructionsMessage",
    "MessageDone", "ParsedMessage", "ParsedToolCall", "ParsedTurn", "PreambleDelta",
    "ReasoningDelta", "ReasoningEffortName", "Recovery", "ResponseFormat", "STOP_TOKEN_IDS",
    "TextDelta", "ToolCall", "ToolCallArgsDelta", "ToolCallEnd", "ToolCallStart", "ToolResult",
    "UserMessage", "VocabError", "build_conversation", "build_developer", "build_system",
    "get_tokenizer", "parse_completion", "render_prompt", "render_tool_result",
    "response_format_section",
    "split_recipient", "vocab_dir",
]
