"""LoRA fine-tuning for gpt-oss: chat JSONL -> Harmony tokens + loss mask, a differentiable
training forward with LoRA adapters (attention, router, MXFP4 experts), a deterministic,
resumable trainer, the PEFT adapter format, and merging into a released-layout checkpoint.

Imports flow one way: train -> model, harmony. Nothing but the CLI imports train. Names are
loaded lazily so that `ossrt --help` does not import torch. See docs/fine-tuning.md.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataConfig": "data", "DataError": "data", "Example": "data", "load_jsonl": "data",
    "pack": "data", "render_example": "data", "parse_conversation": "data",
    "LoraAdapter": "lora", "LoraSpec": "lora", "apply_lora_logits": "lora",
    "greedy_decode": "lora", "train_forward": "lora", "train_hidden": "lora",
    "MergeReport": "merge", "merge_adapter": "merge",
    "load_adapter": "peft_io", "save_adapter": "peft_io",
    "TrainConfig": "trainer", "TrainResult": "trainer", "finetune": "trainer", "train": "trainer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ossrt.train' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
