"""The inference engine: token ids in, token ids out. Knows nothing of text or HTTP.

`LLMEngine` (batched, paged KV cache, prefix reuse; `llm_engine.py`) and its asyncio front
`AsyncEngine` (`async_engine.py`); `generate` (`single.py`) is the single-sequence path of
`ossrt generate`.
This package's top level is plain Python: the torch-backed names load on first use, so the
HTTP layer can use the request types without importing torch.
"""

from typing import Any

from .sequence import (ContextLengthExceeded, EngineError, QueueFull, SampledToken,
                       SamplingParams, StepOutput)

_LAZY = {"generate": "single", "GenerationResult": "single", "sample": "sampler",
         "make_generator": "sampler", "TokenMaskProvider": "sampler"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ContextLengthExceeded", "EngineError", "GenerationResult", "QueueFull", "SampledToken",
    "SamplingParams", "StepOutput", "TokenMaskProvider", "generate", "make_generator", "sample",
]
