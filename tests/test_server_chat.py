"""/v1/chat/completions through the official client: scripted model output (a stub engine that
replays Harmony tokens) for the event mapping, and the live tiny model for the whole path."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

import openai
import pytest

from ossrt.engine.sequence import SamplingParams, StepOutput
from ossrt.harmony.tokenizer import CALL, RETURN, get_tokenizer
from ossrt.server.app import create_app
from ossrt.server.state import ModelCard, ServerState

MODEL = "scripted"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


class ScriptedEngine:
    """Replays the next scripted completion, one token per step, ending on its stop token."""

    def __init__(self) -> None:
        self.scripts: list[list[int]] = []
        self.prompts: list[list[int]] = []
        self.mask_providers: list = []  # what each request passed (None: unconstrained)

    def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                 request_id: str | None = None, mask_provider=None  # noqa: ANN001
                 ) -> AsyncIterator[StepOutput]:
        self.prompts.append(list(prompt_token_ids))
        self.mask_providers.append(mask_provider)
        script = self.scripts.pop(0)
        return self._replay(script, params, len(prompt_token_ids))

    async def _replay(self, script: list[int], params: SamplingParams,
                      n_prompt: int) -> AsyncIterator[StepOutput]:
        for index in range(params.n):
            emitted = 0
            for k, tok in enumerate(script):
                last = k == len(script) - 1
                stop = last and tok in params.stop_token_ids
                cut = params.max_tokens is not None and emitted + 1 >= params.max_tokens
                if not stop:
                    emitted += 1
                yield StepOutput(request_id="r", index=index, token_ids=[] if stop else [tok],
                                 finished=last or cut,
                                 finish_reason=("stop" if stop else "length") if last or cut
                                 else None,
                                 num_prompt_tokens=n_prompt, num_output_tokens=emitted,
                                 stop_token_id=tok if stop else None)
                if cut and not last:
                    break

    def abort(self, request_id: str) -> None:
        pass


def harmony(text: str, end: int) -> list[int]:
    return get_tokenizer().encode(text) + [end]


@pytest.fixture(scope="module")
def scripted(live_server) -> Iterator[tuple[openai.OpenAI, ScriptedEngine]]:
    engine = ScriptedEngine()
    state = ServerState(engine=engine, tokenizer=get_tokenizer(), models=[ModelCard(id=MODEL)])
    with live_server(create_app(state)) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0), engine


REASON_THEN_ANSWER = ("<|channel|>analysis<|message|>The user greets. Answer briefly.<|end|>"
                      "<|start|>assistant<|channel|>final<|message|>Hello! How can I help? 👋")
TOOL_CALL = ("<|channel|>analysis<|message|>Need the weather first.<|end|>"
             "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json"
             "<|message|>{\"city\": \"Paris\"}")


def test_reasoning_then_final(scripted) -> None:
    client, engine = scripted
    engine.scripts.append(harmony(REASON_THEN_ANSWER, RETURN))
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       reasoning_effort="low")
    msg = r.choices[0].message
    assert msg.content == "Hello! How can I help? 👋"
    assert msg.model_extra["reasoning_content"] == "The user greets. Answer briefly."
    assert msg.model_extra["reasoning"] == msg.model_extra["reasoning_content"]
    assert r.choices[0].finish_reason == "stop"
    assert 0 < r.usage.completion_tokens_details.reasoning_tokens < r.usage.completion_tokens
    prompt = get_tokenizer().decode(engine.prompts[-1])
    assert "Reasoning: low" in prompt and prompt.endswith("<|start|>assistant")


def test_streamed_equals_non_streamed(scripted) -> None:
    client, engine = scripted
    engine.scripts += [harmony(REASON_THEN_ANSWER, RETURN), harmony(REASON_THEN_ANSWER, RETURN)]
    full = client.chat.completions.create(model=MODEL,
                                          messages=[{"role": "user", "content": "hi"}])
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True}))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                        for c in chunks if c.choices)
    assert content == full.choices[0].message.content
    assert reasoning == full.choices[0].message.model_extra["reasoning_content"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_tool_call_non_streamed_and_streamed(scripted) -> None:
    client, engine = scripted
    engine.scripts += [harmony(TOOL_CALL, CALL), harmony(TOOL_CALL, CALL)]
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER])
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {
        "city": "Paris"}
    prompt = get_tokenizer().decode(engine.prompts[-1])
    assert "namespace functions" in prompt and "get_weather" in prompt

    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER],
                                                 stream=True))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    first = deltas[0]
    assert first.index == 0 and first.id and first.type == "function"
    assert first.function.name == "get_weather" and first.function.arguments == ""
    assert all(d.id is None and d.function.name is None for d in deltas[1:])
    assert "".join(d.function.arguments for d in deltas) == '{"city": "Paris"}'
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_tool_loop_round_trip_renders_history(scripted) -> None:
    """The assistant's call (with its reasoning) and the tool result go back into the prompt;
    reasoning of a finished earlier turn does not."""
    client, engine = scripted
    engine.scripts.append(harmony("<|channel|>final<|message|>It is sunny in Paris.", RETURN))
    msgs = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!", "reasoning_content": "OLD-THOUGHT"},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "reasoning_content": "LOOP-THOUGHT",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny"}'},
    ]
    r = client.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER])
    assert r.choices[0].message.content == "It is sunny in Paris."
    prompt = get_tokenizer().decode(engine.prompts[-1])
    assert "OLD-THOUGHT" not in prompt and "LOOP-THOUGHT" in prompt
    assert "functions.get_weather to=assistant" in prompt and '{"sky": "sunny"}' in prompt


def test_malformed_output_never_leaks_specials(scripted) -> None:
    client, engine = scripted
    engine.scripts.append(harmony("no header at all, just text<|end|>", RETURN))
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert r.choices[0].message.content == "no header at all, just text"
    assert "<|" not in r.choices[0].message.content


def test_length_cut_mid_message(scripted) -> None:
    client, engine = scripted
    engine.scripts.append(harmony(REASON_THEN_ANSWER, RETURN))
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       max_completion_tokens=20)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 20


def test_chat_errors(scripted) -> None:
    client, _ = scripted
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:x"}}]}])
    assert "text-only" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "x"}])
    assert err.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       tools=[WEATHER],
                                       tool_choice={"type": "function",
                                                    "function": {"name": "other"}})
    assert err.value.body["param"] == "tool_choice"


def test_response_format_is_shown_to_the_model_and_enforced(scripted) -> None:
    client, engine = scripted
    schema = {"type": "object", "properties": {"city": {"type": "string"}},
              "required": ["city"], "additionalProperties": False}
    engine.scripts += [harmony('<|channel|>final<|message|>{"city":"Oslo"}', RETURN),
                       harmony("<|channel|>final<|message|>Hi", RETURN)]
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "where?"}],
        response_format={"type": "json_schema", "json_schema": {
            "name": "place", "description": "A place", "schema": schema, "strict": True}})
    assert json.loads(r.choices[0].message.content) == {"city": "Oslo"}
    prompt = get_tokenizer().decode(engine.prompts[-1])
    developer = prompt.split("<|start|>developer<|message|>")[1].split("<|end|>")[0]
    assert "# Response Formats\n\n## place\n\n// A place\n" in developer
    assert json.dumps(schema, separators=(",", ":")) in developer
    provider = engine.mask_providers[-1]
    assert provider is not None and provider().allowed() is not None
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert engine.mask_providers[-1] is None  # nothing to enforce: no constraint at all
