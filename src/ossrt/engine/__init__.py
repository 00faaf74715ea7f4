"""The inference engine: token ids in, token ids out. Knows nothing of text or HTTP.

`LLMEngine` (batched, paged KV cache, prefix reuse) and its asyncio front `AsyncEngine`;
`generate` is the single-sequence path used by `ossrt generate`.
"""

from .generate import GenerationResult, generate
from .sampler import SampledToken, TokenMaskProvider, make_generator, sample
from .sequence import ContextLengthExceeded, EngineError, QueueFull, SamplingParams

__all__ = [
    "ContextLengthExceeded", "EngineError", "GenerationResult", "QueueFull", "SampledToken",
    "SamplingParams", "TokenMaskProvider", "generate", "make_generator", "sample",
]
