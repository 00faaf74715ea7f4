"""The gpt-oss model in PyTorch: config, checkpoints (read and write), MXFP4, forward pass.

Tokens in, logits out; nothing here knows about text.
"""

from .checkpoint import random_weights, write_checkpoint
from .config import PRESETS, ConfigError, GptOssConfig, preset
from .loader import Checkpoint, CheckpointError, read_checkpoint
from .model import DTYPES, GptOss, KVCache, load_model

__all__ = [
    "PRESETS", "DTYPES", "Checkpoint", "CheckpointError", "ConfigError", "GptOss",
    "GptOssConfig", "KVCache", "load_model", "preset", "random_weights", "read_checkpoint",
    "write_checkpoint",
]
