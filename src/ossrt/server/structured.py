"""Structured outputs at the API edge: response formats and tool choices -> one turn constraint.

Both APIs describe the same things in different shapes (Chat: `response_format`,
`tools[].function.strict`; Responses: `text.format`, `tools[].strict`). They are read here into
`TurnSpec` (ossrt.constraints), compiled once per request, and handed to the engine as a
factory of per-sequence mask providers. A request needs a constraint when it asks for JSON,
has a strict function, or forces a call (`tool_choice` "required" or a named function).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..constraints import (CompiledTurn, GrammarError, GrammarMaskProvider, ToolSpec, TurnSpec,
                           compile_turn, reasoning_budget_for)
from ..harmony import ResponseFormat
from .errors import invalid

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


@dataclass(frozen=True, slots=True)
class FunctionSpec:
    """One function tool as both APIs give it; `param` is where it sits in the request."""

    name: str
    parameters: Mapping[str, Any] | None
    strict: bool
    param: str


@dataclass(frozen=True, slots=True)
class AnswerFormat:
    """The final answer's format: text (json False), any JSON object, or a named schema."""

    json: bool = False
    schema: Mapping[str, Any] | None = None
    name: str = "response"
    description: str | None = None
    param: str = "response_format"

    def prompt_section(self) -> ResponseFormat | None:
        """What the developer message shows the model under `# Response Formats`."""
        if not self.json:
            return None
        return ResponseFormat(self.name, self.schema or {"type": "object"}, self.description)


@dataclass
class Constraint:
    """A compiled constraint; `factory` makes one mask provider per generated sequence."""

    compiled: CompiledTurn
    providers: list[GrammarMaskProvider] = field(default_factory=list)

    def factory(self) -> GrammarMaskProvider:
        provider = GrammarMaskProvider(self.compiled)
        self.providers.append(provider)
        return provider

    def check(self) -> None:
        """Logs any matcher failure (one cannot happen while the engine applies the masks)."""
        for p in self.providers:
            if p.error:
                logger.error("constrained decoding failed after %d tokens: %s", p.num_tokens,
                             p.error)


def chat_answer_format(raw: Mapping[str, Any] | None) -> AnswerFormat:
    """Chat Completions `response_format`."""
    if raw is None:
        return AnswerFormat()
    kind = raw.get("type")
    if kind in (None, "text"):
        return AnswerFormat()
    if kind == "json_object":
        return AnswerFormat(json=True)
    if kind != "json_schema":
        raise invalid("response_format.type must be 'text', 'json_object' or 'json_schema'",
                      "response_format.type")
    spec = raw.get("json_schema")
    if not isinstance(spec, Mapping):
        raise invalid("response_format json_schema needs a 'json_schema' object",
                      "response_format.json_schema")
    return _schema_format(spec, "response_format.json_schema")


def responses_answer_format(raw: Any) -> AnswerFormat:
    """Responses `text.format` (the json_schema fields sit on the format object itself)."""
    if raw is None:
        return AnswerFormat(param="text.format")
    if not isinstance(raw, Mapping):
        raise invalid("text.format must be an object", "text.format")
    kind = raw.get("type")
    if kind in (None, "text"):
        return AnswerFormat(param="text.format")
    if kind == "json_object":
        return AnswerFormat(json=True, param="text.format")
    if kind != "json_schema":
        raise invalid("text.format.type must be 'text', 'json_object' or 'json_schema'",
                      "text.format.type")
    return _schema_format(raw, "text.format")


def _schema_format(spec: Mapping[str, Any], param: str) -> AnswerFormat:
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise invalid("a json_schema format needs a 'name' of at most 64 letters, digits, "
                      "'_' and '-'", f"{param}.name")
    schema = spec.get("schema")
    if schema is not None and not isinstance(schema, Mapping):
        raise invalid("'schema' must be a JSON Schema object", f"{param}.schema")
    description = spec.get("description")
    return AnswerFormat(json=True, schema=schema, name=name,
                        description=description if isinstance(description, str) else None,
                        param=f"{param}.schema")


def turn_spec(answer: AnswerFormat, functions: list[FunctionSpec], tool_choice: Any,
              max_tokens: int | None, builtins: tuple[str, ...] = ()) -> TurnSpec | None:
    """The turn's constraint, or None when nothing needs enforcing. `tool_choice` is already
    validated: None / "auto" / "none" / "required" / a function name. `builtins`: the built-in
    tools the server runs for this request (their calls stay possible under a constraint)."""
    if tool_choice == "none":
        functions = []
    forced = tool_choice not in (None, "auto", "none", "required")
    if forced:
        functions = [f for f in functions if f.name == tool_choice]
    require = tool_choice == "required" or forced
    if not (answer.json or require or any(f.strict for f in functions)):
        return None
    tools = tuple(ToolSpec(f.name, f.parameters if f.strict else None) for f in functions)
    return TurnSpec(json_answer=answer.json, answer_schema=answer.schema, tools=tools,
                    require_tool=require and bool(tools),
                    reasoning_budget=reasoning_budget_for(max_tokens),
                    builtins=tuple(sorted(builtins)))


async def compile_constraint(spec: TurnSpec | None, answer: AnswerFormat,
                             functions: list[FunctionSpec]) -> Constraint | None:
    """Compiles off the event loop; a schema we cannot enforce is a 400 naming its keyword and
    the request param it came from."""
    if spec is None:
        return None

    def build() -> CompiledTurn:
        if answer.json and answer.schema is not None:
            _check(TurnSpec(json_answer=True, answer_schema=answer.schema), answer.param)
        for f in functions:
            if f.strict and f.parameters is not None:
                _check(TurnSpec(json_answer=True, answer_schema=f.parameters), f.param)
        try:
            return compile_turn(spec)
        except GrammarError as exc:
            raise invalid(str(exc), "tools", code="invalid_json_schema") from exc

    return Constraint(await asyncio.to_thread(build))


def _check(spec: TurnSpec, param: str) -> None:
    try:
        compile_turn(spec)
    except GrammarError as exc:
        raise invalid(f"{exc} (in {param})", param, code="invalid_json_schema") from exc
