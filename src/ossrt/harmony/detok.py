"""Incremental detokenization and stop strings: the text-side pieces of streaming."""

from __future__ import annotations

from .tokenizer import HarmonyTokenizer


class IncrementalDecoder:
    """Token ids in, text deltas out, never splitting a multi-byte UTF-8 character.

    Decodes a short window (from the previous emit point) each time, so the cost per token does
    not grow with the length of the output.
    """

    def __init__(self, tokenizer: HarmonyTokenizer, skip_special: bool = False) -> None:
        self.tok, self.skip_special = tokenizer, skip_special
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] decode to text already emitted
        self.read = 0

    def push(self, token: int) -> str:
        if self.skip_special and self.tok.is_special(token):
            return ""
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix:self.read])
        now = self.tok.decode(self.ids[self.prefix:])
        if now.endswith("\ufffd"):
            return ""  # an incomplete character: wait for its next byte(s)
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before):]

    def flush(self) -> str:
        """Whatever is held back (an incomplete character at the very end), replaced."""
        before = self.tok.decode(self.ids[self.prefix:self.read])
        now = self.tok.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return now[len(before):]


class StopMatcher:
    """Cuts streamed text at the first stop string, holding back text that could still turn
    into one. `feed` returns (text safe to emit, stopped)."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""
        self.keep = max((len(s) for s in self.stops), default=1) - 1

    def feed(self, text: str) -> tuple[str, bool]:
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[:min(hits)], True
        cut = max(0, len(buf) - self.keep)
        # Hold back only a tail that is a prefix of some stop string.
        for k in range(min(self.keep, len(buf)), 0, -1):
            if any(s.startswith(buf[-k:]) for s in self.stops):
                cut = len(buf) - k
                break
        else:
            cut = len(buf)
        self.held = buf[cut:]
        return buf[:cut], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out
