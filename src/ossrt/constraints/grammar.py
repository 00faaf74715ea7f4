"""What a constrained assistant turn may be, written as one llguidance Lark grammar.

The grammar covers everything the model writes after the prompt's `<|start|>assistant`:

    [<|channel|>analysis<|message|> free reasoning <|end|><|start|>assistant]   (optional)
    then one of
      <|channel|>final<|message|> ANSWER <|return|>          ANSWER: JSON for the schema, or text
      <|channel|>commentary to=functions.NAME <|constrain|>json<|message|> ARGS <|call|>
      <|channel|>analysis to=python code<|message|> CODE <|call|>       (built-in tools, when on:
      <|channel|>analysis to=browser.FN code<|message|> ARGS <|call|>    free text; they run them)

The reasoning is never constrained beyond its length: it is any text (special tokens are never
text) of at most `reasoning_budget` tokens, after which only `<|end|>` may follow. JSON is
compact (no whitespace between tokens): flexible whitespace lets a model pad without end.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# llguidance's JSON compiler options, embedded in each schema as "x-guidance".
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ",",
                                "key_separator": ":"}
ANY_OBJECT: Mapping[str, Any] = {"type": "object"}


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A function the turn may call; `schema` None leaves its arguments as any JSON object."""

    name: str
    schema: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class TurnSpec:
    """The shape of one assistant turn.

    answer_schema: the final answer's JSON Schema; None with `json_answer` = any JSON object;
    json_answer False = free text. With `require_tool` the turn must end in a call to one of
    `tools` (no final answer). `reasoning_budget` caps the analysis message in tokens (None: no
    cap but max_tokens).
    """

    json_answer: bool = False
    answer_schema: Mapping[str, Any] | None = None
    tools: tuple[ToolSpec, ...] = ()
    require_tool: bool = False
    reasoning_budget: int | None = None
    builtins: tuple[str, ...] = ()  # "browser", "python": their calls are admitted too

    def __post_init__(self) -> None:
        if self.require_tool and not self.tools:
            raise ValueError("require_tool needs at least one tool")
        if self.reasoning_budget is not None and self.reasoning_budget < 0:
            raise ValueError("reasoning_budget must be >= 0")
        if set(self.builtins) - {"browser", "python"}:
            raise ValueError(f"unknown built-in tools {sorted(set(self.builtins))}")


def with_json_options(schema: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `schema` carrying our compiler options (boolean schemas are wrapped)."""
    if not isinstance(schema, Mapping):
        raise ValueError("a JSON Schema must be an object")
    out = dict(schema)
    out["x-guidance"] = {**JSON_OPTIONS, **(schema.get("x-guidance") or {})}
    return out


def _json(schema: Mapping[str, Any]) -> str:
    return "%json " + json.dumps(with_json_options(schema), ensure_ascii=False)


def _lit(text: str) -> str:
    return json.dumps(text)  # a Lark string literal


def build_lark(spec: TurnSpec) -> str:
    """The Lark grammar (llguidance dialect) of one assistant turn."""
    budget = "" if spec.reasoning_budget is None else f"[max_tokens={spec.reasoning_budget}]"
    lines = ["start: reasoning? answer",
             'reasoning: <|channel|> "analysis" <|message|> think <|end|> <|start|> "assistant"',
             f"think{budget}: /(.|\\n)*/"]
    answers = [] if spec.require_tool else ["final"]
    if not spec.require_tool:
        body = "answer_json" if spec.json_answer else "answer_text"
        lines.append(f'final: <|channel|> "final" <|message|> {body} <|return|>')
        if spec.json_answer:
            lines.append(f"answer_json: {_json(spec.answer_schema or ANY_OBJECT)}")
        else:
            lines.append("answer_text: /(.|\\n)*/")
    for i, tool in enumerate(spec.tools):
        answers.append(f"call_{i}")
        header = _lit(f"commentary to=functions.{tool.name} ")
        lines.append(f'call_{i}: <|channel|> {header} <|constrain|> "json" <|message|> '
                     f"args_{i} <|call|>")
        lines.append(f"args_{i}: {_json(tool.schema or ANY_OBJECT)}")
    if spec.builtins and not spec.require_tool:  # the server runs these, then a new turn
        lines.append("tool_text: /(.|\\n)*/")
    if "python" in spec.builtins and not spec.require_tool:
        answers.append("python_call")
        lines.append(f'python_call: <|channel|> {_lit("analysis to=python code")} <|message|> '
                     "tool_text <|call|>")
    if "browser" in spec.builtins and not spec.require_tool:
        answers.append("browser_call")
        lines.append(f'browser_call: <|channel|> "analysis to=browser." browser_fn " code" '
                     "<|message|> tool_text <|call|>")
        lines.append('browser_fn: "search" | "open" | "find"')
    lines.insert(1, "answer: " + " | ".join(answers))
    return "\n".join(lines) + "\n"


def reasoning_budget_for(max_tokens: int | None) -> int | None:
    """How much of max_tokens reasoning may take, so that an answer always has room: all but
    half of max_tokens, at most 1,024 tokens kept back (None: no max_tokens, no cap)."""
    if max_tokens is None:
        return None
    return max_tokens - min(max_tokens // 2, 1024)
