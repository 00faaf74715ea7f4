"""Fine-tuning data: validation with line numbers, Harmony rendering shared with serving, the
loss mask (decoded spans), truncation and packing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ossrt.harmony import FunctionTool, get_tokenizer, render_prompt
from ossrt.train.data import (DataConfig, DataError, Example, collate, load_jsonl, pack,
                              parse_conversation, read_jsonl, render_example)

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}}}}}]
AGENT = {"tools": TOOLS, "messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "reasoning_content": "Need the tool.", "content": None,
     "tool_calls": [{"id": "c1", "type": "function", "function": {
         "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "{\"temp\": 21}"},
    {"role": "assistant", "thinking": "It is 21.", "content": "21 degrees."},
]}
MULTI = {"messages": [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!", "reasoning_content": "greet"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Goodbye!"},
]}


def _spans(ids: list[int], mask: list[int]) -> list[str]:
    tok = get_tokenizer()
    out, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            out.append(tok.decode(cur))
            cur = []
    if cur:
        out.append(tok.decode(cur))
    return out


def test_bad_lines_are_reported_with_line_numbers(tmp_path: Path) -> None:
    good = json.dumps(MULTI)
    lines = [
        good,                                                         # 1 ok
        "{not json",                                                  # 2
        json.dumps({"prompt": "x"}),                                  # 3 missing messages
        json.dumps({"messages": [{"role": "robot", "content": "x"}]}),  # 4 unknown role
        json.dumps({"messages": [{"role": "user", "content": "x"}, {  # 5 bad arguments
            "role": "assistant", "tool_calls": [{"id": "a", "type": "function", "function": {
                "name": "f", "arguments": "{oops"}}]}]}),
        "",                                                           # 6 blank: skipped
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),  # 7
        good,                                                         # 8 ok
        json.dumps({"messages": [{"role": "tool", "tool_call_id": "zz", "content": "x"},
                                 {"role": "assistant", "content": "x"}]}),  # 9
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    problems = dict(info.value.problems)
    assert sorted(problems) == [2, 3, 4, 5, 7, 9]
    assert "invalid JSON" in problems[2]
    assert "missing 'messages'" in problems[3]
    assert "'robot' is unknown" in problems[4]
    assert "arguments is not valid JSON" in problems[5]
    assert "no assistant message" in problems[7]
    assert "matches no earlier assistant tool call" in problems[9]
    assert "line 5:" in str(info.value)


def test_mask_covers_exactly_the_assistant_tokens() -> None:
    ids, mask = render_example(parse_conversation(AGENT, 1))
    assert _spans(ids, mask) == [
        "<|channel|>analysis<|message|>Need the tool.<|end|>"
        "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json"
        "<|message|>{\"city\": \"Paris\"}<|call|>",
        "<|channel|>analysis<|message|>It is 21.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>21 degrees.<|return|>",
    ]
    no_cot = render_example(parse_conversation(AGENT, 1), DataConfig(exclude_reasoning=True))
    assert no_cot[0] == ids
    assert _spans(*no_cot) == [
        "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json"
        "<|message|>{\"city\": \"Paris\"}<|call|>",
        "<|start|>assistant<|channel|>final<|message|>21 degrees.<|return|>",
    ]


def test_multi_turn_drops_old_reasoning_and_old_return() -> None:
    ids, mask = render_example(parse_conversation(MULTI, 1))
    # the first turn's reasoning is dropped (as when serving); its final <|end|> is not trained
    assert _spans(ids, mask) == ["<|channel|>final<|message|>Hello!",
                                 "<|channel|>final<|message|>Goodbye!<|return|>"]


def test_training_tokens_are_the_serving_prompt_plus_the_answer() -> None:
    convo = parse_conversation(AGENT, 1)
    ids, mask = render_example(convo)
    tools = [FunctionTool("get_weather", "Weather", TOOLS[0]["function"]["parameters"])]
    for upto in (2, 4):  # prompts of the first and second assistant turn
        prompt = render_prompt(list(convo.messages[:upto]), tools=tools)
        assert ids[:len(prompt)] == prompt
        assert mask[len(prompt) - 1] == 0 and mask[len(prompt)] == 1


def test_truncation_and_packing(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(MULTI) for _ in range(3)) + "\n")
    full, stats = load_jsonl(path)
    n = len(full[0].input_ids)
    assert stats.examples == 3 and stats.truncated == 0
    short, stats = load_jsonl(path, DataConfig(max_seq_len=n - 3))
    assert stats.truncated == 3 and all(len(e.input_ids) == n - 3 for e in short)
    with pytest.raises(DataError):  # nothing trained is left
        load_jsonl(path, DataConfig(max_seq_len=20))
    rows = pack(full, 2 * n)
    assert [len(r.lines) for r in rows] == [2, 1]
    assert rows[0].positions[n] == 0 and rows[0].segment[n] == 1
    batch = collate(rows, pad_id=0)
    assert batch.ids.shape == (2, 2 * n)
    # no label crosses from one example into the next; padding is never trained
    assert int(batch.labels[0, n - 1]) == -100
    assert (batch.labels[1, n:] == -100).all()
    assert batch.trained_tokens == 3 * sum(full[0].loss_mask[1:])
    one = collate(pack([Example(1, full[0].input_ids, full[0].loss_mask)], n), 0)
    assert (batch.labels[0, :n] == one.labels[0]).all()
