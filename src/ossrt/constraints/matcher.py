"""llguidance over the o200k_harmony vocabulary: compiled turn grammars and per-sequence masks.

`GrammarMaskProvider` is the engine's `TokenMaskProvider` (engine/sampler.py): it gives the
allowed tokens as a packed int32 bitmask (no torch here: the HTTP layer uses this module) and
computes the next mask on a worker thread as soon as it learns the sampled token, so that the
mask for step t+1 is built while the model runs step t+1's forward pass (llguidance drops the
GIL while it computes).
"""

from __future__ import annotations

import base64
import functools
import json
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from llguidance import LLMatcher, LLTokenizer, TokenizerWrapper

from ..harmony.tokenizer import O200K_FILE, RETURN, get_tokenizer, vocab_dir
from .grammar import TurnSpec, build_lark

VOCAB_SIZE = 201088  # o200k_harmony, special tokens included (SPEC 4)

_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ossrt-mask")


class GrammarError(ValueError):
    """A grammar or schema we cannot enforce. `keyword` names an unsupported schema keyword."""

    def __init__(self, message: str, keyword: str | None = None) -> None:
        super().__init__(message)
        self.keyword = keyword


class _Vocab:
    """What llguidance's TokenizerWrapper reads: bytes of every token id, the special ids, and
    an encoder (used only to tokenize forced text canonically)."""

    eos_token_id = RETURN
    bos_token_id = None

    def __init__(self) -> None:
        tok = get_tokenizer()
        tokens: list[bytes] = [b""] * VOCAB_SIZE
        for line in (vocab_dir() / O200K_FILE).read_text().splitlines():
            b64, rank = line.split()
            tokens[int(rank)] = base64.b64decode(b64)
        self.special_token_ids = [i for i, t in enumerate(tokens) if not t]
        for i in self.special_token_ids:  # `<|start|>`, `<|reserved_200013|>`, ...
            tokens[i] = tok.decode([i]).encode()
        self.tokens = tokens
        self._encoding = tok.encoding

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._encoding.encode(text, disallowed_special=())


@functools.cache
def harmony_lltokenizer() -> LLTokenizer:
    """Built once per process (about a second)."""
    return LLTokenizer(TokenizerWrapper(_Vocab()), n_vocab=VOCAB_SIZE)


_UNIMPLEMENTED = re.compile(r'Unimplemented keys: \[([^\]]*)\]')


@dataclass(frozen=True, slots=True)
class CompiledTurn:
    """A validated grammar, ready to start matchers from."""

    grammar: str
    spec: TurnSpec


def compile_turn(spec: TurnSpec) -> CompiledTurn:
    """Validates the turn's grammar (schemas included); raises GrammarError naming the first
    unsupported schema keyword, or with llguidance's message."""
    try:
        grammar = LLMatcher.grammar_from_lark(build_lark(spec))
    except (TypeError, ValueError) as exc:
        raise GrammarError(f"invalid JSON Schema: {exc}") from exc
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, harmony_lltokenizer())
    if is_error:
        message = messages[0] if messages else "invalid grammar"
        found = _UNIMPLEMENTED.search(message)
        if found:
            keys = json.loads(f"[{found.group(1)}]")
            raise GrammarError(f"JSON Schema keyword '{keys[0]}' is not supported",
                               keyword=keys[0])
        raise GrammarError(f"unsupported JSON Schema: {_short(message)}")
    return CompiledTurn(grammar, spec)


def _short(message: str) -> str:
    """llguidance errors can carry a dump of the whole grammar; keep the first line."""
    return message.strip().splitlines()[0][:300] if message.strip() else "invalid"


class GrammarMaskProvider:
    """One sequence's matcher. Contract (engine/sampler.py TokenMaskProvider): `allowed()`
    before each sampled token, then `advance(token)` with the token actually sampled.

    Never raises into the engine and never returns an empty mask: if the matcher fails (it
    cannot, while the engine applies its masks), `error` is set and only `<|return|>` is
    allowed, which ends the sequence.
    """

    def __init__(self, compiled: CompiledTurn) -> None:
        self._matcher = LLMatcher(harmony_lltokenizer(), compiled.grammar, log_level=0)
        self._mask = np.full((VOCAB_SIZE + 31) // 32, -1, dtype=np.int32)  # [W]
        self._pending: Future[None] | None = None
        self._lock = threading.Lock()
        self.error: str | None = None
        self.num_tokens = 0
        self._prefetch()

    def allowed(self) -> np.ndarray:
        """int32 [ceil(V/32)] packed bitmask of the tokens allowed next."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None
        return self._mask

    def advance(self, token: int) -> None:
        if self._pending is not None:  # advance without allowed(): finish the mask first
            self._pending.result()
            self._pending = None
        self.num_tokens += 1
        if self.error is None and not self._matcher.consume_token(token):
            self._fail(self._matcher.get_error() or f"token {token} was not allowed")
            return
        self._prefetch()

    @property
    def is_accepting(self) -> bool:
        """The turn so far is complete (its closing token consumed)."""
        return self.error is None and self._matcher.is_accepting()

    def _prefetch(self) -> None:
        if self.error is None:
            self._pending = _executor.submit(self._compute)

    def _compute(self) -> None:
        with self._lock:
            self._matcher.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
            if self._matcher.is_error():
                self._fail(self._matcher.get_error())
            elif not self._mask.any():  # stopped: the turn is over, let it end
                self._only_return()

    def _fail(self, message: str) -> None:
        self.error = _short(message)
        self._only_return()

    def _only_return(self) -> None:
        self._mask[:] = 0
        self._mask[RETURN // 32] = np.int32(np.uint32(1 << (RETURN % 32)).view(np.int32))
