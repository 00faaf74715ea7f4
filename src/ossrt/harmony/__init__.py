"""Text and chat format: the o200k_harmony tokenizer and (later) Harmony conversations."""

from .tokenizer import HarmonyTokenizer, VocabError, get_tokenizer, vocab_dir

__all__ = ["HarmonyTokenizer", "VocabError", "get_tokenizer", "vocab_dir"]
