"""Prompt rendering: our mapping must equal openai-harmony rendering the intended Conversation.

Every expectation is built here straight from openai_harmony objects, not from ossrt's mapping.
"""

from __future__ import annotations

import pytest
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

from ossrt.harmony import (
    STOP_TOKEN_IDS,
    AssistantMessage,
    FunctionTool,
    InstructionsMessage,
    ResponseFormat,
    ToolCall,
    ToolResult,
    UserMessage,
    build_developer,
    build_system,
    get_tokenizer,
    render_prompt,
)

ENC = get_tokenizer().encoding
KEEP_ALL = RenderConversationConfig(auto_drop_analysis=False)

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "location": {"type": "string", "description": "City and country, e.g. Paris, France"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
        "days": {"type": "array", "items": {"type": "integer"}, "description": "day offsets"},
        "options": {
            "type": "object",
            "properties": {
                "hourly": {"type": "boolean"},
                "fields": {"type": "array",
                           "items": {"type": "string", "enum": ["temp", "wind", "rain"]}},
                "nested": {"type": "object", "properties": {"depth": {"type": "number"}}},
            },
            "required": ["hourly"],
        },
    },
    "required": ["location"],
}
SEARCH_SCHEMA = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
TOOLS = [FunctionTool("get_weather", "Get the weather for a place.", WEATHER_SCHEMA),
         FunctionTool("search_docs", "Search the docs.", SEARCH_SCHEMA),
         FunctionTool("ping", "")]


# -- the reference: openai-harmony objects built directly ----------------------------------

def h_system(effort: ReasoningEffort = ReasoningEffort.MEDIUM, date: str | None = None,
             browser: bool = False, python: bool = False) -> Message:
    content = SystemContent.new().with_reasoning_effort(effort)
    if date:
        content = content.with_conversation_start_date(date)
    if browser:
        content = content.with_browser_tool()
    if python:
        content = content.with_python_tool()
    return Message.from_role_and_content(Role.SYSTEM, content)


def h_developer(instructions: str | None, tools: list[ToolDescription] | None = None) -> Message:
    content = DeveloperContent.new()
    if instructions:
        content = content.with_instructions(instructions)
    if tools:
        content = content.with_function_tools(tools)
    return Message.from_role_and_content(Role.DEVELOPER, content)


H_TOOLS = [ToolDescription.new("get_weather", "Get the weather for a place.", WEATHER_SCHEMA),
           ToolDescription.new("search_docs", "Search the docs.", SEARCH_SCHEMA),
           ToolDescription.new("ping", "")]


def h_user(text: str) -> Message:
    return Message.from_role_and_content(Role.USER, text)


def h_asst(text: str, channel: str) -> Message:
    return Message.from_role_and_content(Role.ASSISTANT, text).with_channel(channel)


def h_call(name: str, args: str, channel: str = "commentary") -> Message:
    """A function call carries `<|constrain|>json`; a built-in tool call (browser, python) the
    `code` content type, as gpt-oss itself writes them (`to=browser.search code`)."""
    kind = "<|constrain|>json" if name.startswith("functions.") else "code"
    return (Message.from_role_and_content(Role.ASSISTANT, args).with_channel(channel)
            .with_recipient(name).with_content_type(kind))


def h_result(name: str, output: str, channel: str = "commentary") -> Message:
    return (Message.from_author_and_content(Author.new(Role.TOOL, name), output)
            .with_recipient("assistant").with_channel(channel))


def reference(messages: list[Message], config: RenderConversationConfig = KEEP_ALL) -> list[int]:
    return ENC.render_conversation_for_completion(
        Conversation.from_messages(messages), Role.ASSISTANT, config)


# -- the corpus ------------------------------------------------------------------------------

def test_plain_user_turn_each_effort() -> None:
    for effort, h_effort in (("low", ReasoningEffort.LOW), ("medium", ReasoningEffort.MEDIUM),
                             ("high", ReasoningEffort.HIGH)):
        ours = render_prompt([UserMessage("Hi!")], reasoning_effort=effort)
        assert ours == reference([h_system(h_effort), h_user("Hi!")])
        assert f"Reasoning: {effort}" in ENC.decode(ours)


def test_system_text_has_identity_cutoff_date_channels() -> None:
    text = ENC.decode(render_prompt([UserMessage("x")], current_date="2025-08-06"))
    assert text.startswith("<|start|>system<|message|>You are ChatGPT")
    for line in ("Knowledge cutoff: 2024-06", "Current date: 2025-08-06", "Reasoning: medium",
                 "# Valid channels: analysis, commentary, final."):
        assert line in text
    assert text.endswith("<|start|>assistant")


def test_prompt_ends_with_start_assistant_and_stop_tokens() -> None:
    ours = render_prompt([UserMessage("x")])
    assert ours[-2:] == [200006, 173781]  # <|start|> "assistant"
    assert STOP_TOKEN_IDS == (200002, 200012)
    assert set(STOP_TOKEN_IDS) == set(ENC.stop_tokens_for_assistant_actions())
    assert 200007 not in STOP_TOKEN_IDS  # never <|end|>


def test_instructions_from_request_and_messages_are_merged() -> None:
    convo = [InstructionsMessage("You are a pirate.", role="system"),
             InstructionsMessage("Answer in French.", role="developer"),
             UserMessage("Hello")]
    ours = render_prompt(convo, instructions="Be brief.", current_date="2025-01-31")
    expected = reference([
        h_system(date="2025-01-31"),
        h_developer("Be brief.\n\nYou are a pirate.\n\nAnswer in French."),
        h_user("Hello")])
    assert ours == expected


def test_function_tools_with_nested_schemas() -> None:
    ours = render_prompt([UserMessage("Weather in Paris?")], reasoning_effort="high",
                         tools=TOOLS, instructions="Use tools.", current_date="2025-06-01")
    expected = reference([h_system(ReasoningEffort.HIGH, "2025-06-01"),
                          h_developer("Use tools.", H_TOOLS), h_user("Weather in Paris?")])
    assert ours == expected
    text = ENC.decode(ours)
    assert "namespace functions {" in text
    assert '"celsius" | "fahrenheit"' in text and "fields?:" in text and "depth?:" in text
    assert "Calls to these tools must go to the commentary channel: 'functions'." in text


def test_tools_without_instructions_and_no_developer_when_empty() -> None:
    assert render_prompt([UserMessage("q")], tools=TOOLS[:1]) == reference(
        [h_system(), h_developer(None, H_TOOLS[:1]), h_user("q")])
    assert build_developer(None, []) is None
    assert "<|start|>developer" not in ENC.decode(render_prompt([UserMessage("q")]))


def test_earlier_reasoning_is_dropped() -> None:
    convo = [UserMessage("q1"), AssistantMessage(text="a1", reasoning="r1"),
             UserMessage("q2"), AssistantMessage(text="a2", reasoning="r2"),
             UserMessage("q3")]
    ours = render_prompt(convo)
    assert ours == reference([h_system(), h_user("q1"), h_asst("a1", "final"), h_user("q2"),
                              h_asst("a2", "final"), h_user("q3")])
    text = ENC.decode(ours)
    assert "r1" not in text and "r2" not in text


def test_openai_harmony_auto_drop_is_narrower_than_the_spec() -> None:
    """What the library does by itself: with one earlier turn it agrees with us ..."""
    one_turn = [h_system(), h_user("q1"), h_asst("r1", "analysis"), h_asst("a1", "final")]
    assert ENC.render_conversation_for_completion(
        Conversation.from_messages([*one_turn, h_user("q2")]), Role.ASSISTANT) == render_prompt(
        [UserMessage("q1"), AssistantMessage(text="a1", reasoning="r1"), UserMessage("q2")])
    # ... but it drops analysis only before the *first* final message (r2 survives), and
    # nothing at all unless the last assistant message is final (r1 survives a tool loop).
    two_turns = one_turn + [h_user("q2"), h_asst("r2", "analysis"), h_asst("a2", "final"),
                            h_user("q3")]
    assert "r2" in ENC.decode(ENC.render_conversation_for_completion(
        Conversation.from_messages(two_turns), Role.ASSISTANT))
    loop = one_turn + [h_user("q2"), h_call("functions.ping", "{}")]
    assert "r1" in ENC.decode(ENC.render_conversation_for_completion(
        Conversation.from_messages(loop), Role.ASSISTANT))


def test_reasoning_inside_the_running_tool_loop_is_kept() -> None:
    convo = [
        InstructionsMessage("Be helpful."),
        UserMessage("Hi"), AssistantMessage(text="Hello!", reasoning="greet back"),
        UserMessage("Weather in Paris and Rome?"),
        AssistantMessage(reasoning="need weather",
                         tool_calls=(ToolCall("c1", "get_weather", '{"location": "Paris"}'),)),
        ToolResult("c1", '{"temp": 21}'),
        AssistantMessage(text="Checking Rome too.", reasoning="now Rome and docs",
                         tool_calls=(ToolCall("c2", "get_weather", '{"location": "Rome"}'),
                                     ToolCall("c3", "search_docs", '{"q": "rome"}'))),
        ToolResult("c2", '{"temp": 25}'),
        ToolResult("c3", "no docs", name="search_docs"),
    ]
    ours = render_prompt(convo, tools=TOOLS, current_date="2025-02-03")
    expected = reference([
        h_system(date="2025-02-03"), h_developer("Be helpful.", H_TOOLS),
        h_user("Hi"), h_asst("Hello!", "final"),
        h_user("Weather in Paris and Rome?"),
        h_asst("need weather", "analysis"),
        h_call("functions.get_weather", '{"location": "Paris"}'),
        h_result("functions.get_weather", '{"temp": 21}'),
        h_asst("now Rome and docs", "analysis"), h_asst("Checking Rome too.", "commentary"),
        h_call("functions.get_weather", '{"location": "Rome"}'),
        h_call("functions.search_docs", '{"q": "rome"}'),
        h_result("functions.get_weather", '{"temp": 25}'),
        h_result("functions.search_docs", "no docs"),
    ])
    assert ours == expected
    text = ENC.decode(ours)
    assert "greet back" not in text and "need weather" in text and "now Rome" in text
    assert ('<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json'
            '<|message|>{"location": "Paris"}<|call|>') in text
    assert ('<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>'
            '{"temp": 21}<|end|>') in text


def test_finished_tool_loop_reasoning_is_dropped_next_turn() -> None:
    convo = [UserMessage("q"),
             AssistantMessage(reasoning="r-call", tool_calls=(ToolCall("c1", "ping", "{}"),)),
             ToolResult("c1", "pong"), AssistantMessage(text="done", reasoning="r-final"),
             UserMessage("thanks")]
    ours = render_prompt(convo, tools=TOOLS[2:])
    assert ours == reference([h_system(), h_developer(None, H_TOOLS[2:]), h_user("q"),
                              h_call("functions.ping", "{}"), h_result("functions.ping", "pong"),
                              h_asst("done", "final"), h_user("thanks")])


def test_builtin_tools_in_system_message_and_their_calls() -> None:
    convo = [UserMessage("Find X"),
             AssistantMessage(reasoning="search it", tool_calls=(
                 ToolCall("b1", "search", '{"query": "X"}', namespace="browser",
                          channel="analysis"),)),
             ToolResult("b1", "[0] X result"),
             AssistantMessage(tool_calls=(ToolCall("p1", "python", "print(1)", namespace=None,
                                                   channel="analysis"),)),
             ToolResult("p1", "1")]
    ours = render_prompt(convo, builtin_tools=["browser", "python"], reasoning_effort="low")
    expected = reference([
        h_system(ReasoningEffort.LOW, browser=True, python=True), h_user("Find X"),
        h_asst("search it", "analysis"),
        h_call("browser.search", '{"query": "X"}', channel="analysis"),
        h_result("browser.search", "[0] X result", channel="analysis"),
        h_call("python", "print(1)", channel="analysis"),
        h_result("python", "1", channel="analysis")])
    assert ours == expected
    assert "namespace browser {" in ENC.decode(ours) and "## python" in ENC.decode(ours)


def test_assistant_placeholders_and_cut_turns() -> None:
    convo = [UserMessage("a"), AssistantMessage(), UserMessage("b"),
             AssistantMessage(reasoning="cut off here"), UserMessage("c"),
             AssistantMessage(reasoning="partial")]
    # An empty assistant turn renders as an empty final; a reasoning-only turn before the last
    # user message vanishes; reasoning after it (a continued turn) is kept.
    assert render_prompt(convo) == reference([
        h_system(), h_user("a"), h_asst("", "final"), h_user("b"), h_user("c"),
        h_asst("partial", "analysis")])


def test_response_format_hook() -> None:
    fmt = ResponseFormat("shopping_list", {"type": "object", "properties": {
        "items": {"type": "array", "items": {"type": "string"}}}}, "entries to buy")
    ours = render_prompt([UserMessage("list")], instructions="Shop.", response_format=fmt)
    section = ('# Response Formats\n\n## shopping_list\n\n// entries to buy\n'
               '{"type":"object","properties":{"items":{"type":"array","items":'
               '{"type":"string"}}}}')
    developer = h_developer("Shop.").adding_content(TextContent(text="\n\n" + section))
    assert ours == reference([h_system(), developer, h_user("list")])
    only = build_developer(None, [], fmt)
    assert only is not None and ENC.decode(ENC.render(only)).startswith(
        "<|start|>developer<|message|># Response Formats")


def test_tool_result_resolution_and_errors() -> None:
    by_name = render_prompt([UserMessage("q"), ToolResult("zz", "out", name="ping")])
    assert "<|start|>functions.ping to=assistant" in ENC.decode(by_name)
    with pytest.raises(ValueError, match="no earlier tool call"):
        render_prompt([UserMessage("q"), ToolResult("missing", "out")])
    with pytest.raises(ValueError, match="reasoning_effort"):
        build_system("extreme")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="built-in tool"):
        build_system("low", None, ["shell"])
