"""One sequence through the model with a KV cache: the simplest generation path."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..model import GptOss
from .sampler import make_generator, sample
from .sequence import SamplingParams


@dataclass
class GenerationResult:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" when a stop token ended it (it is not included)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0


def stream_tokens(model: GptOss, prompt: list[int], params: SamplingParams,
                  result: GenerationResult | None = None) -> Iterator[int]:
    """Yields sampled token ids, prefilling the prompt once and then decoding one at a time.

    Stops after max_tokens, at the model's context limit, or before yielding a stop token.
    """
    if not prompt:
        raise ValueError("the prompt must hold at least one token")
    limit = model.cfg.max_position_embeddings
    if len(prompt) >= limit:
        raise ValueError(f"prompt of {len(prompt)} tokens leaves no room in the "
                         f"{limit}-token context")
    result = result or GenerationResult(list(prompt))
    max_tokens = params.max_tokens or limit
    capacity = min(limit, len(prompt) + max_tokens)
    cache = model.new_cache(1, capacity)
    gen = make_generator(params.seed)  # the same stream the batched engine uses for this seed
    stops = set(params.stop_token_ids)

    t0 = time.perf_counter()
    hidden = model(torch.tensor([prompt]), 0, cache)  # [1, T, H]
    logits = model.logits(hidden[0, -1])  # [V]
    result.prefill_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        while True:
            token = sample(logits.cpu()[None], [params], [result.token_ids], [gen])[0].token
            if token in stops:
                result.finish_reason = "stop"
                return
            result.token_ids.append(token)
            yield token
            if len(result.token_ids) >= max_tokens or cache.length >= capacity:
                return
            hidden = model(torch.tensor([[token]]), cache.length, cache)
            logits = model.logits(hidden[0, -1])
    finally:
        result.decode_seconds = time.perf_counter() - t0


def generate(model: GptOss, prompt: list[int], params: SamplingParams) -> GenerationResult:
    result = GenerationResult(list(prompt))
    for _ in stream_tokens(model, prompt, params, result):
        pass
    return result
