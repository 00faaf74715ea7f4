"""The turn grammar and mask provider (ossrt.constraints) on scripted tokens, and the engine's
packed-mask path; no model needed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ossrt.constraints import GrammarError, GrammarMaskProvider, ToolSpec, TurnSpec, compile_turn
from ossrt.constraints.grammar import reasoning_budget_for
from ossrt.engine.sampler import unpack_bitmask
from ossrt.harmony import HarmonyStreamParser
from ossrt.harmony.tokenizer import CALL, CHANNEL, CONSTRAIN, END, MESSAGE, RETURN, START
from ossrt.harmony.tokenizer import get_tokenizer

V = 201088
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
          "additionalProperties": False}


def allowed(p: GrammarMaskProvider) -> np.ndarray:
    return unpack_bitmask(p.allowed(), V).numpy()


def feed(p: GrammarMaskProvider, tokens: list[int]) -> None:
    for t in tokens:
        assert allowed(p)[t], f"token {t} ({get_tokenizer().decode([t])!r}) refused"
        p.advance(t)


def enc(text: str) -> list[int]:
    return get_tokenizer().encode(text, allow_special=False)


def test_unpack_bitmask_matches_the_bit_layout() -> None:
    rng = np.random.default_rng(0)
    bits = rng.random(V) < 0.3
    words = np.packbits(np.concatenate([bits, np.zeros(-V % 32, bool)]), bitorder="little")
    out = unpack_bitmask(words.view(np.int32), V)
    assert out.dtype == torch.bool and torch.equal(out, torch.from_numpy(bits))
    with pytest.raises(ValueError):
        unpack_bitmask(np.zeros(3, np.int32), V)


def test_reasoning_is_free_and_the_answer_is_held_to_the_schema() -> None:
    p = GrammarMaskProvider(compile_turn(TurnSpec(json_answer=True, answer_schema=SCHEMA)))
    first = allowed(p)
    assert first[CHANNEL] and first.sum() == 1  # a turn opens with a channel
    feed(p, [CHANNEL, *enc("analysis"), MESSAGE])
    mask = allowed(p)
    # reasoning: any text, brackets and prose alike; never a stray special token but <|end|>
    for text in ["{", "Let me think", " ```", "\n"]:
        assert mask[enc(text)[0]]
    assert mask[END] and not mask[RETURN] and not mask[START]
    feed(p, enc("I should answer {n: 3}."))
    feed(p, [END, START, *enc("assistant"), CHANNEL, *enc("final"), MESSAGE])
    mask = allowed(p)
    assert mask[enc('{"')[0]] and not mask[enc("Sure")[0]] and not mask[RETURN]
    feed(p, enc('{"n":42}'))
    assert allowed(p)[RETURN]
    feed(p, [RETURN])
    assert p.is_accepting and p.error is None


def test_reasoning_budget_forces_the_end_of_thinking() -> None:
    p = GrammarMaskProvider(compile_turn(TurnSpec(json_answer=True, answer_schema=SCHEMA,
                                                  reasoning_budget=4)))
    feed(p, [CHANNEL, *enc("analysis"), MESSAGE])
    feed(p, enc(" a b c d"))
    mask = allowed(p)
    assert mask[END] and mask.sum() == 1
    assert reasoning_budget_for(None) is None
    assert reasoning_budget_for(100) == 50 and reasoning_budget_for(10_000) == 10_000 - 1024


def test_required_tool_call_parses_as_a_call() -> None:
    spec = TurnSpec(tools=(ToolSpec("get_weather", SCHEMA), ToolSpec("other")),
                    require_tool=True)
    p = GrammarMaskProvider(compile_turn(spec))
    feed(p, [CHANNEL])
    assert not allowed(p)[enc("final")[0]]  # no final answer: the turn must call
    tokens = [*enc("commentary to=functions.get_weather "), CONSTRAIN, *enc("json"),
              MESSAGE, *enc('{"n":7}'), CALL]
    feed(p, tokens)
    assert p.is_accepting
    parser = HarmonyStreamParser()
    for t in [CHANNEL, *tokens]:
        parser.feed(t)
    parser.finish("stop")
    (call,) = parser.turn.tool_calls
    assert call.function_name == "get_weather" and json.loads(call.arguments) == {"n": 7}


def test_a_refused_token_ends_the_turn_instead_of_raising() -> None:
    p = GrammarMaskProvider(compile_turn(TurnSpec(json_answer=True)))
    p.allowed()
    p.advance(enc("hello")[0])  # not a channel token: the matcher fails
    mask = allowed(p)
    assert p.error and mask[RETURN] and mask.sum() == 1


def test_unsupported_keywords_are_named() -> None:
    with pytest.raises(GrammarError) as err:
        compile_turn(TurnSpec(json_answer=True, answer_schema={
            "type": "array", "uniqueItems": True}))
    assert err.value.keyword == "uniqueItems"
    with pytest.raises(GrammarError):
        compile_turn(TurnSpec(json_answer=True, answer_schema={"type": "strin"}))


def test_builtin_tool_calls_stay_possible_under_a_json_answer() -> None:
    """With the server's built-in tools on, a constrained turn may still call python or the
    browser (free-form, the server runs them); function calls it was not given stay out."""
    spec = TurnSpec(json_answer=True, answer_schema=SCHEMA, builtins=("browser", "python"))
    for call in ["analysis to=python code", "analysis to=browser.search code"]:
        p = GrammarMaskProvider(compile_turn(spec))
        feed(p, [CHANNEL, *enc(call), MESSAGE, *enc('print({"a": 1})\n'), CALL])
    p = GrammarMaskProvider(compile_turn(spec))
    feed(p, [CHANNEL])
    assert not allowed(p)[enc("commentary")[0]]  # no function call was offered
    plain = GrammarMaskProvider(compile_turn(TurnSpec(json_answer=True, answer_schema=SCHEMA)))
    feed(plain, [CHANNEL, *enc("analysis")])
    assert not allowed(plain)[enc(" to")[0]]  # without builtins: analysis is reasoning only
    with pytest.raises(ValueError):
        TurnSpec(builtins=("shell",))
