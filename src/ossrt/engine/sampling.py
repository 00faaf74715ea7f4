"""Token sampling from logits (temperature; the full sampler arrives with the batched engine)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy; OpenAI's recommended default for gpt-oss is 1
    max_tokens: int = 256
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")


def sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    """logits [V] float32 -> one token id. Greedy at temperature 0 (lowest id on ties)."""
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
