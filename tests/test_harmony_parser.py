"""The lenient streaming Harmony parser: well-formed turns (checked against openai-harmony's
own parser), every malformed shape we recover from, finish reasons and UTF-8 streaming."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import pytest
from openai_harmony import Role

from ossrt.harmony import (
    Event,
    HarmonyStreamParser,
    MessageDone,
    ParsedTurn,
    PreambleDelta,
    ReasoningDelta,
    TextDelta,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
    get_tokenizer,
    parse_completion,
    split_recipient,
)

ENC = get_tokenizer().encoding


def toks(text: str) -> list[int]:
    return ENC.encode(text, allowed_special="all")


def ids() -> itertools.count[int]:
    return itertools.count()


@dataclass
class Run:
    events: list[Event]
    turn: ParsedTurn

    def text_of(self, kind: type) -> str:
        return "".join(getattr(e, "text") for e in self.events if isinstance(e, kind))

    @property
    def reasons(self) -> list[str]:
        return [r.reason for r in self.turn.recoveries]


def run(tokens: list[int], reason_if_cut: str = "length") -> Run:
    counter = ids()
    parser = HarmonyStreamParser(call_id_factory=lambda: f"call_{next(counter)}")
    events: list[Event] = []
    for token in tokens:
        events += parser.feed(token)
    events += parser.finish(reason_if_cut)  # type: ignore[arg-type]
    return Run(events, parser.turn)


def assert_consistent(r: Run, *, valid_utf8: bool = True) -> None:
    """Deltas concatenate to the summary; no special-token text anywhere; a call per start."""
    t = r.turn
    assert r.text_of(ReasoningDelta) == t.reasoning
    assert r.text_of(TextDelta) == t.text
    assert r.text_of(PreambleDelta) == "".join(t.preambles)
    for call in t.tool_calls:
        args = "".join(e.text for e in r.events
                       if isinstance(e, ToolCallArgsDelta) and e.index == call.index)
        assert args == call.arguments
        assert ToolCallStart(call.index, call.call_id, call.name, call.channel) in r.events
        assert ToolCallEnd(call.index) in r.events
    texts = [t.reasoning, t.text, *t.preambles, *(c.arguments for c in t.tool_calls),
             *(c.name for c in t.tool_calls), *(m.text for m in t.messages)]
    assert not any("<|" in s or "|>" in s for s in texts), texts
    assert not valid_utf8 or not any("\ufffd" in s for s in texts)
    assert "internal_error" not in r.reasons
    assert sum(isinstance(e, MessageDone) for e in r.events) == len(t.messages)


def library_messages(tokens: list[int]) -> list[tuple[str | None, str | None, str]]:
    out = []
    for m in ENC.parse_messages_from_completion_tokens(tokens, Role.ASSISTANT):
        out.append((m.channel, m.recipient, "".join(getattr(c, "text") for c in m.content)))
    return out


def ours_messages(turn: ParsedTurn) -> list[tuple[str | None, str | None, str]]:
    return [(m.channel, m.recipient, m.text) for m in turn.messages]


# -- well-formed ----------------------------------------------------------------------------

WELL_FORMED = {
    "reasoning_then_final": (
        "<|channel|>analysis<|message|>User says hi. Reply.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Hello! How can I help?<|return|>"),
    "function_call": (
        "<|channel|>analysis<|message|>Need weather.<|end|>"
        "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
        '<|message|>{"location": "Paris", "options": {"days": [1, 2]}}<|call|>'),
    "recipient_before_channel": (
        "<|channel|>analysis<|message|>Call it.<|end|>"
        "<|start|>assistant to=functions.get_weather<|channel|>commentary json"
        '<|message|>{"location": "Rome"}<|call|>'),
    "preamble_then_call": (
        "<|channel|>analysis<|message|>Plan.<|end|>"
        "<|start|>assistant<|channel|>commentary<|message|>Let me look that up.<|end|>"
        "<|start|>assistant<|channel|>commentary to=functions.search <|constrain|>json"
        '<|message|>{"q": "x"}<|call|>'),
    "builtin_browser_on_analysis": (
        "<|channel|>analysis<|message|>Search.<|end|>"
        '<|start|>assistant<|channel|>analysis to=browser.search code<|message|>{"query": "x"}'
        "<|call|>"),
    "builtin_python": (
        "<|channel|>analysis to=python code<|message|>print(2 + 2)<|call|>"),
    "final_only_multibyte": "<|channel|>final<|message|>Ça va? 日本語 🦜🦖 done.<|return|>",
}


@pytest.mark.parametrize("name", sorted(WELL_FORMED))
def test_well_formed_matches_openai_harmony(name: str) -> None:
    tokens = toks(WELL_FORMED[name])
    r = run(tokens)
    assert_consistent(r)
    assert r.reasons == []
    assert ours_messages(r.turn) == library_messages(tokens)


def test_reasoning_then_final_events() -> None:
    r = run(toks(WELL_FORMED["reasoning_then_final"]))
    assert r.turn.reasoning == "User says hi. Reply."
    assert r.turn.text == "Hello! How can I help?"
    assert r.turn.finish == "stop" and r.turn.tool_calls == ()
    done = [e for e in r.events if isinstance(e, MessageDone)]
    assert done == [MessageDone("analysis", None), MessageDone("final", None)]
    # Reasoning deltas all come before the first final delta.
    kinds = [type(e) for e in r.events if isinstance(e, (ReasoningDelta, TextDelta))]
    assert kinds == sorted(kinds, key=lambda k: k is TextDelta)


def test_function_call_args_stream_and_concatenate() -> None:
    r = run(toks(WELL_FORMED["function_call"]))
    (call,) = r.turn.tool_calls
    assert (call.index, call.call_id, call.name, call.channel) == (
        0, "call_0", "functions.get_weather", "commentary")
    assert call.namespace == "functions" and call.function_name == "get_weather"
    assert call.arguments == '{"location": "Paris", "options": {"days": [1, 2]}}'
    assert sum(isinstance(e, ToolCallArgsDelta) for e in r.events) > 3  # streamed, not batched
    assert r.turn.finish == "tool_calls"
    start = next(i for i, e in enumerate(r.events) if isinstance(e, ToolCallStart))
    end = next(i for i, e in enumerate(r.events) if isinstance(e, ToolCallEnd))
    assert all(isinstance(e, ToolCallArgsDelta) for e in r.events[start + 1:end])


def test_two_calls_in_one_turn() -> None:
    text = ("<|channel|>commentary to=functions.a <|constrain|>json<|message|>{\"x\": 1}<|call|>"
            "<|start|>assistant<|channel|>commentary to=functions.b <|constrain|>json"
            "<|message|>{\"y\": 2}<|call|>")
    r = run(toks(text))
    assert_consistent(r)
    assert [(c.index, c.name, c.arguments) for c in r.turn.tool_calls] == [
        (0, "functions.a", '{"x": 1}'), (1, "functions.b", '{"y": 2}')]
    assert len({c.call_id for c in r.turn.tool_calls}) == 2
    assert r.turn.finish == "tool_calls" and r.reasons == []


def test_preamble_then_call() -> None:
    r = run(toks(WELL_FORMED["preamble_then_call"]))
    assert r.turn.preambles == ("Let me look that up.",)
    assert r.text_of(PreambleDelta) == "Let me look that up."
    assert r.turn.text == "" and r.turn.tool_calls[0].name == "functions.search"


def test_builtin_python_call() -> None:
    (call,) = run(toks(WELL_FORMED["builtin_python"])).turn.tool_calls
    assert (call.name, call.channel, call.arguments) == ("python", "analysis", "print(2 + 2)")
    assert call.namespace is None and call.function_name == "python"


# -- finish reasons ---------------------------------------------------------------------------

def test_stop_vs_length() -> None:
    assert run(toks("<|channel|>final<|message|>All done.<|return|>")).turn.finish == "stop"
    cut = run(toks("<|channel|>final<|message|>All do"))
    assert cut.turn.finish == "length" and cut.turn.text == "All do" and cut.reasons == []
    assert run(toks("<|channel|>final<|message|>All do"), "stop").turn.finish == "stop"
    mid_reasoning = run(toks("<|channel|>analysis<|message|>Thinking abo"))
    assert mid_reasoning.turn.finish == "length" and mid_reasoning.turn.reasoning == "Thinking abo"


def test_cut_mid_tool_arguments_closes_the_call() -> None:
    r = run(toks('<|channel|>commentary to=functions.f <|constrain|>json<|message|>{"a": [1, '))
    assert_consistent(r)
    assert r.turn.finish == "length" and r.turn.tool_calls[0].arguments == '{"a": [1, '
    assert isinstance(r.events[-2], ToolCallEnd)


def test_cut_mid_header_emits_nothing_broken() -> None:
    for text in ("<|channel|>analysis<|message|>x<|end|><|start|>assistant<|channel|>fin",
                 "<|channel|>analysis<|message|>x<|end|><|start|>assistant<|channel|>commentary"
                 " to=functions.get_wea", "<|channel|>analysis<|message|>x<|end|><|start|>assis"):
        r = run(toks(text))
        assert_consistent(r)
        assert r.turn.finish == "length" and r.turn.text == "" and r.turn.tool_calls == ()
        assert r.turn.reasoning == "x" and "cut_in_header" in r.reasons


def test_finish_is_idempotent_and_tokens_after_return_are_recovered() -> None:
    parser = HarmonyStreamParser()
    parser.feed_many(toks("<|channel|>final<|message|>Hi<|return|>more"))
    assert [r.reason for r in parser.recoveries] == ["tokens_after_stop", "missing_start"]
    parser.finish()
    assert parser.finish() == [] and parser.turn.text == "Himore"


# -- malformed output ---------------------------------------------------------------------------

MALFORMED = [
    # (name, harmony text, expected recovery reason, expected final text or None, tool names)
    ("garbage_before_channel", "xq<|channel|>final<|message|>Paris.<|return|>",
     "header_junk", "Paris.", []),
    ("garbage_after_start", "<|channel|>analysis<|message|>t<|end|><|start|>assistant junk"
     "<|channel|>final<|message|>Paris.<|return|>", "header_junk", "Paris.", []),
    ("missing_channel", "<|start|>assistant<|message|>Paris.<|return|>",
     "missing_channel", "Paris.", []),
    ("missing_channel_mid_turn", "<|channel|>analysis<|message|>t<|end|>"
     "<|start|>assistant<|message|>Paris.<|return|>",
     "missing_channel", "Paris.", []),
    ("missing_channel_with_recipient", "<|channel|>analysis<|message|>t<|end|>"
     "<|start|>assistant to=functions.f<|message|>{}<|call|>", "missing_channel", None,
     ["functions.f"]),
    ("missing_message_short", "<|channel|>final The capital is Paris.<|return|>",
     "missing_message", "The capital is Paris.", []),
    ("missing_message_long", "<|channel|>final The capital of France is Paris, of course, "
     "and it has been for a long time.<|return|>", "missing_message",
     "The capital of France is Paris, of course, and it has been for a long time.", []),
    ("no_header_at_all", "The capital of France is Paris.<|return|>", "missing_message",
     "The capital of France is Paris.", []),
    ("no_header_short", "Paris.<|return|>", "missing_message", "Paris.", []),
    ("no_header_newline", "Paris\nis the capital.", "missing_message",
     "Paris\nis the capital.", []),
    ("unknown_channel", "<|channel|>finale<|message|>Paris.<|return|>", "unknown_channel",
     "Paris.", []),
    ("made_up_channel", "<|channel|>answer<|message|>Paris.<|return|>", "unknown_channel",
     "Paris.", []),
    ("recipient_junk", "<|channel|>commentary to=functions.get_weather}} <|constrain|>json"
     "<|message|>{}<|call|>", "bad_recipient", None, ["functions.get_weather"]),
    ("recipient_special_inside", "<|channel|>commentary to=functions.f<|constrain|>json"
     "<|channel|>commentary<|message|>{}<|call|>", "repeated_channel", None, ["functions.f"]),
    ("recipient_glued_to_channel", "<|channel|>commentaryto=functions.f json<|message|>{}"
     "<|call|>", "glued_recipient", None, ["functions.f"]),
    ("space_after_to", "<|channel|>commentary to= functions.f <|constrain|>json<|message|>{}"
     "<|call|>", "bad_recipient", None, ["functions.f"]),
    ("call_ended_by_end", "<|channel|>commentary to=functions.f <|constrain|>json<|message|>{}"
     "<|end|>", "call_ended_by_end", None, ["functions.f"]),
    ("call_ended_by_return", "<|channel|>commentary to=functions.f <|constrain|>json"
     "<|message|>{}<|return|>", "call_ended_by_return", None, ["functions.f"]),
    ("channel_without_channel_token", "<|start|>assistant final<|message|>Paris.<|return|>",
     "missing_channel_token", "Paris.", []),
    ("no_header_starting_with_a_channel_word", "final answers are rare.<|return|>",
     "missing_message", "final answers are rare.", []),
    ("end_after_final", "<|channel|>final<|message|>Paris.<|end|>", "end_after_final",
     "Paris.", []),
    ("end_after_final_then_more", "<|channel|>final<|message|>Paris.<|end|><|start|>assistant"
     "<|channel|>final<|message|> Really.<|return|>", "end_after_final", "Paris. Really.", []),
    ("missing_end", "<|channel|>analysis<|message|>think<|start|>assistant<|channel|>final"
     "<|message|>Paris.<|return|>", "missing_end", "Paris.", []),
    ("channel_inside_content", "<|channel|>analysis<|message|>think<|channel|>final"
     "<|message|>Paris.<|return|>", "missing_end", "Paris.", []),
    ("missing_start", "<|channel|>analysis<|message|>think<|end|><|channel|>final<|message|>"
     "Paris.<|return|>", "missing_start", "Paris.", []),
    ("missing_start_text", "<|channel|>analysis<|message|>think<|end|>assistant<|channel|>"
     "final<|message|>Paris.<|return|>", "missing_start", "Paris.", []),
    ("stray_specials_in_content", "<|channel|>final<|message|>Par<|message|>is<|constrain|>."
     "<|return|>", "stray_special", "Paris.", []),
    ("reserved_token", "<|channel|>final<|message|>Paris<|reserved_200013|>.<|return|>",
     "stray_special", "Paris.", []),
    ("return_after_analysis", "<|channel|>analysis<|message|>I will say Paris.<|return|>",
     "return_without_final", "", []),
    ("call_without_recipient", "<|channel|>commentary<|message|>Calling now<|call|>",
     "call_without_recipient", "", []),
    ("endoftext", "<|channel|>final<|message|>Paris.<|endoftext|>", "endoftext", "Paris.", []),
    ("interrupted_header", "<|channel|>final Paris is<|start|>assistant<|channel|>final"
     "<|message|> the capital.<|return|>", "header_interrupted", "Paris is the capital.", []),
    ("unexpected_role", "<|channel|>analysis<|message|>t<|end|><|start|>functions.f to=assistant"
     "<|channel|>commentary<|message|>fake output<|end|><|start|>assistant<|channel|>final"
     "<|message|>Paris.<|return|>", "unexpected_role", "Paris.", []),
]


MALFORMED_BY_NAME = {name: text for name, text, *_ in MALFORMED}


@pytest.mark.parametrize("case", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_is_recovered(case: tuple) -> None:
    _, text, reason, final, tools = case
    r = run(toks(text))
    assert_consistent(r)
    assert reason in r.reasons, r.reasons
    if final is not None:
        assert r.turn.text == final
    assert [c.name for c in r.turn.tool_calls] == tools


def test_recipient_with_special_token_text_written_as_plain_text() -> None:
    tokens = (toks("<|channel|>commentary")
              + ENC.encode(" to=functions.lookup<|constrain|>json", disallowed_special=())
              + toks("<|message|>{}<|call|>"))
    r = run(tokens)
    assert_consistent(r)
    assert [c.name for c in r.turn.tool_calls] == ["functions.lookup"]
    assert "bad_recipient" in r.reasons


def test_malformed_calls_still_finish_as_tool_calls() -> None:
    for name in ("call_ended_by_return", "recipient_junk", "space_after_to"):
        assert run(toks(MALFORMED_BY_NAME[name])).turn.finish == "tool_calls"
    assert run(toks(MALFORMED_BY_NAME["call_without_recipient"])).turn.finish == "stop"


def test_messages_keep_order_for_output_items() -> None:
    turn = run(toks(WELL_FORMED["preamble_then_call"])).turn
    assert [(m.channel, m.recipient) for m in turn.messages] == [
        ("analysis", None), ("commentary", None), ("commentary", "functions.search")]
    assert split_recipient("functions.search") == ("functions", "search")
    assert split_recipient("python") == (None, "python")


def test_hallucinated_tool_reply_is_hidden_not_called() -> None:
    r = run(toks(MALFORMED_BY_NAME["unexpected_role"]))
    assert r.reasons == ["unexpected_role"]
    assert r.turn.reasoning == "tfake output" and r.turn.preambles == ()


def test_recoveries_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="ossrt.harmony.parser"):
        r = run(toks("xq<|channel|>finale<|message|>Paris.<|end|>"))
    assert len(caplog.records) == len(r.turn.recoveries) == 3
    assert all("harmony recovery" in rec.getMessage() for rec in caplog.records)


def test_no_header_text_streams_before_the_end() -> None:
    tokens = toks("The capital of France is Paris, and it is lovely in spring time.")
    parser = HarmonyStreamParser()
    streamed = "".join(e.text for t in tokens for e in parser.feed(t)  # type: ignore[union-attr]
                       if isinstance(e, TextDelta))
    assert streamed.startswith("The capital of France is Paris")


# -- UTF-8 and chunking ------------------------------------------------------------------------

def test_multibyte_characters_split_across_tokens_never_break() -> None:
    text = "日本語 🦜🦖🧬 龘靐齉 ﷺ 𝄞 ok"
    body = ENC.encode(text)
    broken = [t for t in body if bytes(ENC._inner.decode_bytes([t])).decode("utf-8", "replace")
              .count("\ufffd")]
    assert len(broken) >= 6  # the test really splits characters across tokens
    for channel in ("final", "analysis"):
        r = run(toks(f"<|channel|>{channel}<|message|>") + body + toks("<|return|>"))
        deltas = [e.text for e in r.events if isinstance(e, (TextDelta, ReasoningDelta))]
        assert all("\ufffd" not in d for d in deltas)
        assert "".join(deltas) == text
    args = run(toks("<|channel|>commentary to=functions.f<|message|>") + body + toks("<|call|>"))
    assert args.turn.tool_calls[0].arguments == text


def test_incomplete_utf8_at_cut_is_dropped_and_counted() -> None:
    body = ENC.encode("ok 🦜")
    r = run(toks("<|channel|>final<|message|>") + body[:-1])
    assert r.turn.text == "ok " and "incomplete_utf8" in r.reasons


def test_whole_vs_token_by_token_vs_library() -> None:
    corpus = [*WELL_FORMED.values(), *(c[1] for c in MALFORMED)]
    for text in corpus:
        tokens = toks(text)
        streamed = run(tokens)
        counter = ids()
        whole = parse_completion(tokens, call_id_factory=lambda: f"call_{next(counter)}")
        assert whole == streamed.turn
        assert_consistent(streamed)


def test_random_token_soup_never_raises_or_leaks() -> None:
    rng = random.Random(1234)
    specials = toks("<|start|><|channel|><|message|><|end|><|return|><|call|><|constrain|>"
                    "<|endoftext|><|reserved_200013|>")
    words = toks("assistant to=functions.get_weather analysis commentary final json "
                 "hello 日本 🦜 {\"a\": 1} \n") + ENC.encode("🦜🦖")
    for _ in range(300):
        tokens = [rng.choice(specials if rng.random() < 0.3 else words)
                  for _ in range(rng.randint(0, 40))]
        assert_consistent(run(tokens), valid_utf8=False)  # the soup splits characters
