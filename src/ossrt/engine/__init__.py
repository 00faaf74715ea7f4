"""The inference engine: token ids in, token ids out. Knows nothing of text or HTTP."""

from .generate import GenerationResult, generate
from .sampling import SamplingParams, sample

__all__ = ["GenerationResult", "SamplingParams", "generate", "sample"]
