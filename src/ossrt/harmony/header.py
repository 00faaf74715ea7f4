"""Lenient parsing of one Harmony message header (the text between `<|start|>` and `<|message|>`).

A header arrives as parts split by special tokens: the role part (before any `<|channel|>`),
channel parts (after each `<|channel|>`) and constrain parts (after each `<|constrain|>`).
Well-formed examples, both of which the model writes:
    assistant<|channel|>commentary to=functions.f <|constrain|>json
    assistant to=functions.f<|channel|>commentary json
A header that never reaches `<|message|>` is parsed with `complete=False`: header words are read
while they look like header words, and the text from the first word that does not is content.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias

PartKind: TypeAlias = Literal["role", "channel", "constrain"]
CHANNELS = ("analysis", "commentary", "final")
ROLES = ("assistant", "user", "system", "developer")
# Content types the model writes after the channel without <|constrain|>.
_LOOSE_CONTENT_TYPES = frozenset({"json", "code", "text", "python", "markdown", "md"})
_NOT_RECIPIENTS = frozenset({"all", *ROLES})
_RECIPIENT = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*(?:\.[A-Za-z_][A-Za-z0-9_\-]*)*")
# Words, with a glued `to=` split off ("commentaryto=functions.f" -> "commentary", "to=...").
_WORD = re.compile(r"to=\S*|\S+?(?=to=)|\S+")


@dataclass(frozen=True, slots=True)
class Header:
    channel: str
    recipient: str | None
    content_type: str | None
    content: str  # text that turned out not to be header (only when complete=False)
    issues: tuple[tuple[str, str], ...]  # (reason, detail) per malformed spot


def clean_recipient(raw: str) -> tuple[str | None, str | None]:
    """(recipient, issue detail) from the text after `to=`; a clean dotted identifier or None."""
    match = _RECIPIENT.match(raw)
    if match is None:
        return None, f"unusable recipient {raw!r}"
    name = match.group(0).rstrip("-")
    if name in _NOT_RECIPIENTS:
        return None, None if name == "all" else f"recipient {name!r} is not a tool"
    if name != raw:
        return name, f"recipient {raw!r} cleaned to {name!r}"
    return name, None


def normalize_channel(word: str, *, allow_prefix: bool = False) -> str | None:
    """A known channel for `word`, exact or contained (`analysis:` -> analysis), or with
    `allow_prefix` one it begins (`fin` -> final, for a header cut short); else None."""
    lowered = word.lower()
    if lowered in CHANNELS:
        return lowered
    contained = next((c for c in CHANNELS if c in lowered), None)
    if contained is None and allow_prefix:
        return next((c for c in CHANNELS if c.startswith(lowered)), None)
    return contained


def _looks_like_role(word: str) -> bool:
    return "." in word or any(role.startswith(word) for role in ROLES)


class _Reader:
    """Walks the header words, collecting fields; stops at content when the header is partial."""

    def __init__(self, role_known: bool, complete: bool) -> None:
        self.role_known, self.complete = role_known, complete
        self.channel: str | None = None
        self.recipient: str | None = None
        self.content_type: str | None = None
        self.issues: list[tuple[str, str]] = []
        self.junk: list[str] = []
        self.main_taken = False  # the part's channel / constrain type was read
        self.foreign_role: str | None = None  # the model writing as a tool or the user
        self.pending_to = False

    def _to(self, word: str) -> None:
        if word == "to=":  # `to= functions.f`: the name is the next word
            self.pending_to = True
            return
        recipient, issue = clean_recipient(word[3:])
        if recipient is None and self.foreign_role and word[3:] == "assistant":
            return  # a tool's (hallucinated) reply is addressed to the assistant
        if issue:
            self.issues.append(("bad_recipient", issue))
        if recipient is None:
            return
        if self.recipient is None:
            self.recipient = recipient
        elif recipient != self.recipient:
            self.issues.append(("bad_recipient", f"second recipient {recipient!r} ignored"))

    def accept(self, kind: PartKind, word: str, first_word: bool) -> bool:
        """Take `word` into the header; False when it is content (partial headers only)."""
        if word.startswith("to="):
            self._to(word)
            return True
        if self.pending_to:
            self.pending_to = False
            self.issues.append(("bad_recipient", f"space after to= before {word!r}"))
            self._to("to=" + word)
            return True
        if kind == "role":
            if first_word and not self.role_known and (self.complete or _looks_like_role(word)):
                if word != "assistant":
                    self.foreign_role = word
                    self.issues.append(("unexpected_role", f"role {word!r}: kept as analysis"))
                return True
            if word == "assistant" and self.role_known and first_word:
                return True  # the role repeated after a missing <|start|>
            if self.complete and self.channel is None and word in CHANNELS:
                self.channel = word
                self.issues.append(("missing_channel_token", f"channel {word!r} without "
                                    "<|channel|>"))
                return True
        elif kind == "channel" and not self.main_taken:
            channel = normalize_channel(word, allow_prefix=not self.complete)
            if channel is None and not self.complete:
                return False
            self.main_taken = True
            if self.channel is not None:
                self.issues.append(("repeated_channel", f"channel {word!r} after "
                                    f"{self.channel!r}"))
                return True
            if channel != word:
                self.issues.append(("unknown_channel", f"channel {word!r}"))
            self.channel = channel
            return True
        elif kind == "constrain" and not self.main_taken:
            self.main_taken = True
            self.content_type = self.content_type or f"<|constrain|>{word}"
            return True
        if self.content_type is None and kind == "channel" and (
                self.complete or word.lower() in _LOOSE_CONTENT_TYPES):
            self.content_type = word
            return True
        if not self.complete:
            return False
        self.junk.append(word)
        return True


def parse_header(parts: Sequence[tuple[PartKind, str]], *, role_known: bool,
                 complete: bool) -> Header:
    """Header fields from its parts. `role_known`: the role came before (the prompt's
    `<|start|>assistant`). `complete`: `<|message|>` ended it (else the rest is content)."""
    reader = _Reader(role_known, complete)
    content_from: tuple[int, int] | None = None  # (part index, char offset)
    first_word = True
    for p, (kind, text) in enumerate(parts):
        reader.main_taken = False
        for match in _WORD.finditer(text):
            if text.startswith("to=", match.end()) and not match.group(0).startswith("to="):
                reader.issues.append(("glued_recipient", f"{match.group(0)!r} glued to to="))
            if not reader.accept(kind, match.group(0), first_word):
                content_from = (p, match.start())
                break
            first_word = False
        if content_from is not None:
            break
    content = ""
    if content_from is not None:
        p, offset = content_from
        content = parts[p][1][offset:] + "".join(text for _, text in parts[p + 1:])
    issues = list(reader.issues)
    if reader.junk:
        issues.append(("header_junk", f"dropped {' '.join(reader.junk)!r}"))
    channel = reader.channel
    if channel is None:
        channel = "commentary" if reader.recipient else "final"
        if not any(reason == "unknown_channel" for reason, _ in issues):
            issues.append(("missing_channel", f"no channel in header: {channel} assumed"))
    if reader.foreign_role is not None:  # never show it to the user nor call a tool with it
        return Header("analysis", None, reader.content_type, content, tuple(issues))
    return Header(channel, reader.recipient, reader.content_type, content, tuple(issues))
