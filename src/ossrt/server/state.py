"""What the HTTP layer needs from below: an engine client, a tokenizer, the served models.

The server never imports torch or the model: `ossrt serve` builds the engine and hands it in.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..engine.sequence import SamplingParams, StepOutput
from ..harmony.tokenizer import HarmonyTokenizer
from .errors import not_found

if TYPE_CHECKING:
    from .agent import BuiltinTools
    from .auth import Authenticator
    from .ratelimit import RateLimiter
    from .store import ResponseStore


class EngineClient(Protocol):
    """`ossrt.engine.async_engine.AsyncEngine` satisfies this."""

    def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                 request_id: str | None = None,
                 mask_provider: Callable[[], Any] | None = None) -> AsyncIterator[StepOutput]: ...

    def abort(self, request_id: str) -> None: ...


@dataclass(frozen=True, slots=True)
class ModelCard:
    id: str
    created: int = field(default_factory=lambda: int(time.time()))
    owned_by: str = "ossrt"
    max_model_len: int = 131072
    vocab_size: int = 201088
    note: str | None = None  # e.g. that this is the tiny random preset
    adapter: str | None = None  # the engine's LoRA adapter serving this id (None: base model)
    parent: str | None = None  # for an adapter: the base model id

    def to_api(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "object": "model", "created": self.created,
                               "owned_by": self.owned_by, "max_model_len": self.max_model_len}
        if self.note:
            out["note"] = self.note
        if self.parent:
            out["parent"] = self.parent
        return out


@dataclass
class ServerState:
    engine: EngineClient
    tokenizer: HarmonyTokenizer
    models: list[ModelCard]
    store: ResponseStore | None = None  # stored Responses API objects (None: kept in memory)
    auth: Authenticator | None = None  # API keys (None: auth off)
    rate_limits: RateLimiter | None = None  # per-key tiers (None: unlimited)
    metrics_public: bool = False  # GET /metrics without a key even when auth is on
    engine_stats: Callable[[], dict[str, float]] | None = None  # engine gauges for /metrics
    request_timeout: float | None = None  # s a generation may take (None: no limit)
    builtin_tools: BuiltinTools | None = None  # browser / python for the Responses API
    model_dir: str | None = None  # the base checkpoint (what fine-tuning jobs train on)
    data_dir: str | None = None  # files, jobs and their outputs live under it
    # Serve a LoRA adapter folder under a new model id at once (`ossrt serve` sets it; None:
    # this app cannot load adapters). Blocking: call it through asyncio.to_thread.
    add_adapter: Callable[[str, str], None] | None = None
    jobs: Any = None  # the fine-tuning JobRunner (create_app makes one given both dirs)
    batches: Any = None  # the BatchRunner (create_app makes one given a data dir)
    # Per-process secret the batch runner's in-process calls carry (x-ossrt-internal): the
    # gateway lets exactly these through without an API key or rate limits. Never sent out.
    internal_secret: str = field(default_factory=lambda: secrets.token_hex(32), repr=False)

    def model(self, name: str | None, param: str = "model") -> ModelCard:
        for card in self.models:
            if card.id == name:
                return card
        raise not_found(f"The model '{name}' does not exist or you do not have access to it.",
                        param=param, code="model_not_found")
