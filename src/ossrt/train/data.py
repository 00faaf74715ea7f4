"""Chat fine-tuning data: OpenAI chat JSONL -> Harmony token ids + loss mask, and packing.

Each line is `{"messages": [...], "tools": [...]}` (OpenAI's chat fine-tuning format). Every
line is validated before anything is rendered; all problems are collected into one `DataError`
naming each 1-based line number, so training never starts on invalid data.

Rendering goes through the serving renderer (`ossrt.harmony.build_conversation` + openai-harmony's
`render_conversation_for_training`), so a training example's tokens up to any assistant turn are
exactly the prompt the server renders for that turn (tests/test_train_data.py checks it).

The loss mask is 1 on exactly the tokens the model itself writes at serving time:
- every assistant message's body: `<|channel|>...<|message|>text` and its closing `<|end|>`,
  `<|call|>` or `<|return|>` (the last message of the example ends with `<|return|>`);
- the `<|start|>assistant` header only when the model writes it, i.e. when the message follows
  another assistant message of the same turn (after a user or tool message the prompt ends
  with `<|start|>assistant`, as the server renders it); a tool call's ` to=functions.f` is the
  model's and is trained;
- not the `<|end|>` closing a final answer of an earlier turn: history renders it as `<|end|>`
  where the model wrote `<|return|>`.
As in serving (SPEC 4), reasoning of assistant turns before the last user message is dropped.
With `exclude_reasoning`, analysis-channel messages are in the input but not trained.

Truncation: an example longer than `max_seq_len` keeps its first `max_seq_len` tokens; if no
trained token is left it is dropped. Both are counted in `DatasetStats`.
Packing: whole examples are packed greedily, in file order, into rows of at most `max_seq_len`
tokens; positions restart at 0 for each example and attention never crosses examples (the
training forward masks by segment), so a packed example sees exactly what it would alone.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from openai_harmony import RenderConversationConfig, Role

from ..harmony import (AssistantMessage, ChatMessage, FunctionTool, InstructionsMessage,
                       ToolCall, ToolResult, UserMessage, build_conversation, get_tokenizer)
from ..harmony.tokenizer import START

ROLES = ("system", "developer", "user", "assistant", "tool")
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


class DataError(ValueError):
    """Invalid training data; `problems` lists (1-based line number, reason)."""

    def __init__(self, path: str, problems: list[tuple[int, str]]) -> None:
        self.path, self.problems = path, problems
        shown = "\n".join(f"  line {n}: {why}" for n, why in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"{path}: {len(problems)} invalid line(s):\n{shown}{more}")


class _Bad(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class DataConfig:
    max_seq_len: int = 2048
    exclude_reasoning: bool = False
    reasoning_effort: str = "medium"
    current_date: str | None = None  # the server renders today's date; None renders none

    def __post_init__(self) -> None:
        if self.max_seq_len < 8:
            raise ValueError("max_seq_len must be at least 8")
        if self.reasoning_effort not in ("low", "medium", "high"):
            raise ValueError("reasoning_effort must be low, medium or high")


@dataclass(frozen=True, slots=True)
class Conversation:
    """One validated line: neutral chat messages and function tools."""

    line: int
    messages: tuple[ChatMessage, ...]
    tools: tuple[FunctionTool, ...] = ()


@dataclass(frozen=True, slots=True)
class Example:
    line: int
    input_ids: tuple[int, ...]
    loss_mask: tuple[int, ...]  # 1 where the token is trained (predicted from its prefix)
    truncated: bool = False


@dataclass(frozen=True, slots=True)
class DatasetStats:
    examples: int
    dropped: int  # truncated to no trained token
    truncated: int
    tokens: int
    trained_tokens: int


@dataclass(frozen=True, slots=True)
class PackedRow:
    """Several whole examples in one row: `segment` numbers them, `positions` restart at 0."""

    input_ids: tuple[int, ...]
    loss_mask: tuple[int, ...]
    positions: tuple[int, ...]
    segment: tuple[int, ...]
    lines: tuple[int, ...] = field(default_factory=tuple)


# ---------------------------------------------------------------- validation


def _text(content: Any, where: str, allow_none: bool = False) -> str | None:
    if content is None:
        if allow_none:
            return None
        raise _Bad(f"{where}.content is missing")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") in ("text", "input_text",
                                                                      "output_text")
                    and isinstance(part.get("text"), str)):
                raise _Bad(f"{where}.content[{j}] is not a text part")
            parts.append(part["text"])
        return "".join(parts)
    raise _Bad(f"{where}.content must be a string or a list of text parts")


def _tool_calls(raw: Any, where: str) -> tuple[ToolCall, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise _Bad(f"{where}.tool_calls must be a list")
    calls = []
    for j, tc in enumerate(raw):
        w = f"{where}.tool_calls[{j}]"
        fn = tc.get("function") if isinstance(tc, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise _Bad(f"{w}.function.name is missing")
        if tc.get("type", "function") != "function":
            raise _Bad(f"{w}.type must be 'function'")
        args = fn.get("arguments")
        if not isinstance(args, str):
            raise _Bad(f"{w}.function.arguments must be a JSON string")
        try:
            json.loads(args)
        except json.JSONDecodeError as exc:
            raise _Bad(f"{w}.function.arguments is not valid JSON ({exc.msg})") from None
        call_id = tc.get("id")
        if call_id is not None and (not isinstance(call_id, str) or not call_id):
            raise _Bad(f"{w}.id must be a non-empty string")
        calls.append(ToolCall(call_id=call_id or f"call_{j}", name=fn["name"], arguments=args))
    return tuple(calls)


def _tools(raw: Any) -> tuple[FunctionTool, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise _Bad("tools must be a list")
    out = []
    for j, t in enumerate(raw):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(
                fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise _Bad(f"tools[{j}] must be {{'type': 'function', 'function': {{'name': ...}}}}")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise _Bad(f"tools[{j}].function.parameters must be a JSON Schema object")
        desc = fn.get("description") or ""
        if not isinstance(desc, str):
            raise _Bad(f"tools[{j}].function.description must be a string")
        out.append(FunctionTool(fn["name"], desc, params))
    return tuple(out)


def parse_conversation(obj: Any, line: int) -> Conversation:
    """One decoded JSONL object -> `Conversation`; raises ValueError with the reason."""
    if not isinstance(obj, dict):
        raise _Bad("line is not a JSON object")
    raw = obj.get("messages")
    if raw is None:
        raise _Bad("missing 'messages'")
    if not isinstance(raw, list) or not raw:
        raise _Bad("'messages' must be a non-empty list")
    tools = _tools(obj.get("tools"))
    out: list[ChatMessage] = []
    call_ids: set[str] = set()
    n_assistant = 0
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _Bad(f"{where} is not an object")
        role = m.get("role")
        if role not in ROLES:
            raise _Bad(f"{where}.role {role!r} is unknown (expected one of {', '.join(ROLES)})")
        if "weight" in m and m["weight"] not in (1, 1.0):
            raise _Bad(f"{where}.weight {m['weight']!r}: only weight 1 is supported")
        if role in ("system", "developer"):
            out.append(InstructionsMessage(_text(m.get("content"), where) or "", role=role))
        elif role == "user":
            out.append(UserMessage(_text(m.get("content"), where) or ""))
        elif role == "assistant":
            calls = _tool_calls(m.get("tool_calls"), where)
            reasoning = None
            for key in REASONING_KEYS:
                if m.get(key) is not None:
                    if not isinstance(m[key], str):
                        raise _Bad(f"{where}.{key} must be a string")
                    reasoning = m[key] or None
                    break
            text = _text(m.get("content"), where, allow_none=True) or None
            if text is None and reasoning is None and not calls:
                raise _Bad(f"{where}: assistant message has no content, reasoning or tool_calls")
            call_ids.update(c.call_id for c in calls)
            out.append(AssistantMessage(text=text, reasoning=reasoning, tool_calls=calls))
            n_assistant += 1
        else:  # tool
            cid = m.get("tool_call_id")
            if not isinstance(cid, str) or not cid:
                raise _Bad(f"{where}.tool_call_id is missing")
            if cid not in call_ids:
                raise _Bad(f"{where}.tool_call_id {cid!r} matches no earlier assistant tool call")
            out.append(ToolResult(call_id=cid, output=_text(m.get("content"), where) or ""))
    if n_assistant == 0:
        raise _Bad("no assistant message to train on")
    return Conversation(line, tuple(out), tools)


def read_jsonl(path: str | Path) -> list[Conversation]:
    """Parses and validates every line; raises `DataError` listing all invalid lines."""
    problems: list[tuple[int, str]] = []
    out: list[Conversation] = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(str(path), [(0, f"cannot read file: {exc}")]) from exc
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append((n, f"invalid JSON ({exc.msg} at column {exc.colno})"))
            continue
        try:
            out.append(parse_conversation(obj, n))
        except ValueError as exc:
            problems.append((n, str(exc)))
    if not out and not problems:
        problems.append((0, "no examples"))
    if problems:
        raise DataError(str(path), problems)
    return out


# ---------------------------------------------------------------- rendering


def render_example(convo: Conversation, cfg: DataConfig = DataConfig()
                   ) -> tuple[list[int], list[int]]:
    """Harmony token ids of the whole conversation and its loss mask (see module docstring)."""
    enc = get_tokenizer().encoding
    effort: Any = cfg.reasoning_effort  # validated in DataConfig
    harmony = build_conversation(convo.messages, reasoning_effort=effort, tools=convo.tools,
                                 current_date=cfg.current_date)
    ids: list[int] = enc.render_conversation_for_training(
        harmony, RenderConversationConfig(auto_drop_analysis=False))
    starts = [i for i, t in enumerate(ids) if t == START]
    msgs = harmony.messages
    if len(starts) != len(msgs):
        raise _Bad(f"rendered {len(starts)} Harmony messages, expected {len(msgs)} (message "
                   "text containing special tokens?)")
    assistant_tok = enc.encode("assistant", allowed_special=set())[0]
    mask = [0] * len(ids)
    for k, (msg, s) in enumerate(zip(msgs, starts)):
        if msg.author.role != Role.ASSISTANT:
            continue
        e = starts[k + 1] if k + 1 < len(starts) else len(ids)
        if cfg.exclude_reasoning and msg.channel == "analysis" and not msg.recipient:
            continue
        if ids[s + 1] != assistant_tok:
            raise _Bad("unexpected assistant header rendering")
        begin = s if k > 0 and msgs[k - 1].author.role == Role.ASSISTANT else s + 2
        end = e
        if msg.channel == "final" and k + 1 < len(msgs):
            end = e - 1  # history's <|end|> where the model wrote <|return|>
        for i in range(begin, end):
            mask[i] = 1
    return ids, mask


def load_jsonl(path: str | Path, cfg: DataConfig = DataConfig()
               ) -> tuple[list[Example], DatasetStats]:
    """Validate, render and truncate every example of a JSONL file."""
    convos = read_jsonl(path)
    problems: list[tuple[int, str]] = []
    out: list[Example] = []
    dropped = truncated = 0
    for c in convos:
        try:
            ids, mask = render_example(c, cfg)
        except ValueError as exc:
            problems.append((c.line, f"cannot render: {exc}"))
            continue
        cut = len(ids) > cfg.max_seq_len
        if cut:
            ids, mask = ids[:cfg.max_seq_len], mask[:cfg.max_seq_len]
            truncated += 1
        if not any(mask[1:]):
            dropped += 1
            continue
        out.append(Example(c.line, tuple(ids), tuple(mask), cut))
    if problems:
        raise DataError(str(path), problems)
    if not out:
        raise DataError(str(path), [(0, f"no example left with a trained token within "
                                        f"max_seq_len={cfg.max_seq_len}")])
    stats = DatasetStats(len(out), dropped, truncated, sum(len(e.input_ids) for e in out),
                         sum(sum(e.loss_mask[1:]) for e in out))
    return out, stats


def pack(examples: Sequence[Example], max_seq_len: int, packing: bool = True
         ) -> list[PackedRow]:
    """Greedy, order-preserving packing of whole examples into rows of <= max_seq_len."""
    rows: list[PackedRow] = []
    cur: list[Example] = []

    def flush() -> None:
        if cur:
            rows.append(PackedRow(
                input_ids=tuple(t for e in cur for t in e.input_ids),
                loss_mask=tuple(m for e in cur for m in e.loss_mask),
                positions=tuple(p for e in cur for p in range(len(e.input_ids))),
                segment=tuple(s for s, e in enumerate(cur) for _ in e.input_ids),
                lines=tuple(e.line for e in cur)))
            cur.clear()

    for ex in examples:
        if cur and (not packing or sum(len(e.input_ids) for e in cur) + len(ex.input_ids)
                    > max_seq_len):
            flush()
        cur.append(ex)
    flush()
    return rows


@dataclass(frozen=True, slots=True)
class Batch:
    ids: torch.Tensor  # [B, T] int64, padded with pad_id
    positions: torch.Tensor  # [B, T] int64
    segment: torch.Tensor  # [B, T] int64, -1 on padding
    labels: torch.Tensor  # [B, T] int64: the next token, -100 where not trained

    @property
    def trained_tokens(self) -> int:
        return int((self.labels != -100).sum())

    @property
    def tokens(self) -> int:
        return int((self.segment >= 0).sum())


def collate(rows: Sequence[PackedRow], pad_id: int) -> Batch:
    """Rows -> right-padded tensors; a label at t is token t+1 of the same segment if trained."""
    t = max(len(r.input_ids) for r in rows)
    b = len(rows)
    ids = torch.full((b, t), pad_id, dtype=torch.int64)
    pos = torch.zeros((b, t), dtype=torch.int64)
    seg = torch.full((b, t), -1, dtype=torch.int64)
    labels = torch.full((b, t), -100, dtype=torch.int64)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids)
        pos[i, :n] = torch.tensor(r.positions)
        seg[i, :n] = torch.tensor(r.segment)
        nxt = torch.tensor(r.input_ids[1:])
        trained = (torch.tensor(r.loss_mask[1:]) == 1) & (torch.tensor(r.segment[1:])
                                                          == torch.tensor(r.segment[:-1]))
        labels[i, :n - 1] = torch.where(trained, nxt, torch.full_like(nxt, -100))
    return Batch(ids, pos, seg, labels)
