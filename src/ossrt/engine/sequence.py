"""Request and sequence state: plain Python, shared by the scheduler, KV manager and runner."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


class EngineError(Exception):
    """Base of the engine's user-facing errors; `code` follows OpenAI's error codes."""

    code = "engine_error"


class ContextLengthExceeded(EngineError):
    code = "context_length_exceeded"


class QueueFull(EngineError):
    code = "queue_full"


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request sampling. Defaults follow OpenAI's recommendation for gpt-oss."""

    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    seed: int | None = None
    max_tokens: int | None = None  # None: up to the context limit
    stop_token_ids: tuple[int, ...] = ()
    n: int = 1
    logprobs: int | None = None  # None: off; k >= 0: the sampled token's logprob + top-k others
    adapter: str | None = None  # a LoRA adapter added with LLMEngine.add_adapter; None: base

    def __post_init__(self) -> None:
        problems = []
        if self.temperature < 0:
            problems.append("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            problems.append("top_p must be in (0, 1]")
        if self.top_k < 0:
            problems.append("top_k must be >= 0")
        if not 0 <= self.min_p <= 1:
            problems.append("min_p must be in [0, 1]")
        if self.max_tokens is not None and self.max_tokens < 1:
            problems.append("max_tokens must be >= 1")
        if self.n < 1:
            problems.append("n must be >= 1")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            problems.append("logprobs must be between 0 and 20")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True, slots=True)
class SampledToken:
    token: int
    # log-softmax of the RAW logits (before bias, penalties and temperature), as OpenAI and vLLM
    # report it; None unless params.logprobs is not None
    logprob: float | None = None
    # the params.logprobs most likely (token, logprob) of the same raw distribution, best first
    top_logprobs: tuple[tuple[int, float], ...] = ()


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """One generated continuation. KV for tokens [0, num_computed) is in the cache."""

    seq_id: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    index: int = 0  # which of the request's n choices
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[object] = field(default_factory=list)  # per token, from the sampler
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    num_preemptions: int = 0
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    arrival_time: float = field(default_factory=time.monotonic)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED


@dataclass
class StepOutput:
    """One sequence's progress in one step."""

    request_id: str
    index: int  # which of the request's n choices
    token_ids: list[int]  # new this step (empty when the step only prefilled or it stopped)
    logprobs: list[SampledToken] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    stop_token_id: int | None = None  # the stop token that ended the sequence (not in token_ids)
