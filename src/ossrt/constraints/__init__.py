"""Structured outputs: JSON Schema and tool-call constraints on an assistant turn, enforced by
token masks (llguidance) that the engine applies while sampling. No torch here."""

from .grammar import ToolSpec, TurnSpec, build_lark, reasoning_budget_for
from .matcher import (CompiledTurn, GrammarError, GrammarMaskProvider, compile_turn,
                      harmony_lltokenizer)

__all__ = ["CompiledTurn", "GrammarError", "GrammarMaskProvider", "ToolSpec", "TurnSpec",
           "build_lark", "compile_turn", "harmony_lltokenizer", "reasoning_budget_for"]
