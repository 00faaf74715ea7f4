"""`LLMEngine`: many requests through one model, token ids in and token ids out.

One step is: schedule -> run the model on the scheduled chunks -> sample -> update.
The engine knows nothing of text: stop strings and chat formats live above it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..model import GptOss
from ..model.config import FULL, SLIDING
from ..model.lora import LoraBatch, LoraWeights
from .kv_cache import KVCacheManager, KVCacheSpec
from .paged_attention import PagedAttention, PagedKVStorage
from .sampler import TokenMaskProvider, make_generator, sample
from .scheduler import ScheduledChunk, Scheduler, SchedulerConfig
from .sequence import SampledToken, SamplingParams, Sequence, StepOutput


@dataclass(frozen=True, slots=True)
class EngineConfig:
    block_size: int = 16
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512  # tokens per step: the prefill chunk size bound
    max_queue_len: int = 1024
    max_model_len: int | None = None  # default: the model's context, capped by the KV cache
    kv_cache_bytes: int = 2 << 30  # both block pools together
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("block_size, max_num_seqs and max_num_batched_tokens must be >= 1")


def kv_cache_spec(model: GptOss, config: EngineConfig) -> KVCacheSpec:
    """Splits the KV budget: the sliding pool gets what max_num_seqs sequences can need (plus a
    quarter for prefix reuse); the full pool gets the rest."""
    cfg, bs = model.cfg, config.block_size
    has = {g: g in cfg.layer_types for g in (FULL, SLIDING)}
    per_block = {g: PagedKVStorage.bytes_per_block(cfg, g, bs, model.dtype) for g in (FULL, SLIDING)}
    sliding = 0
    if has[SLIDING]:
        per_seq = math.ceil((cfg.sliding_window + config.max_num_batched_tokens - 1) / bs) + 1
        sliding = math.ceil(config.max_num_seqs * per_seq * 1.25)
    budget = config.kv_cache_bytes - sliding * per_block[SLIDING]
    full = max(0, budget // per_block[FULL]) if has[FULL] else 0
    if has[FULL] and full < 2:
        raise ValueError(f"kv_cache_bytes={config.kv_cache_bytes} leaves no room for the "
                         "full-attention KV cache")
    return KVCacheSpec(block_size=bs, num_blocks_full=int(full), num_blocks_sliding=sliding,
                       sliding_window=cfg.sliding_window if has[SLIDING] else None,
                       enable_prefix_caching=config.enable_prefix_caching)


class LLMEngine:
    def __init__(self, model: GptOss, config: EngineConfig = EngineConfig()) -> None:
        self.model, self.config = model, config
        self.spec = kv_cache_spec(model, config)
        capacity = (self.spec.num_blocks_full * self.spec.block_size
                    if self.spec.num_blocks_full else model.cfg.max_position_embeddings)
        self.max_model_len = min(config.max_model_len or model.cfg.max_position_embeddings,
                                 model.cfg.max_position_embeddings, capacity)
        self.kv = KVCacheManager(self.spec)
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_queue_len=config.max_queue_len, max_model_len=self.max_model_len), self.kv)
        self.storage = PagedKVStorage(model.cfg, self.spec, model.dtype, model.device)
        self.num_preemptions = 0  # since start, for metrics
        self._generators: dict[int, torch.Generator] = {}
        self._masks: dict[int, TokenMaskProvider] = {}
        self.adapters: dict[str, LoraWeights] = {}

    def add_adapter(self, name: str, weights: LoraWeights) -> None:
        """Serves a LoRA adapter to requests whose params name it (no copy of base weights).
        Safe to call from another thread: a single dict store, read by the engine per step."""
        cfg = self.model.cfg
        weights.check({"q_proj": (cfg.q_dim, cfg.hidden_size),
                       "k_proj": (cfg.kv_dim, cfg.hidden_size),
                       "v_proj": (cfg.kv_dim, cfg.hidden_size),
                       "o_proj": (cfg.hidden_size, cfg.q_dim),
                       "router": (cfg.num_local_experts, cfg.hidden_size)},
                      cfg.num_hidden_layers)
        self.adapters[name] = weights

    # ---- requests ----------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    mask_provider: Callable[[], TokenMaskProvider] | None = None) -> None:
        """Queues a request (n sequences). Raises ContextLengthExceeded / QueueFull / ValueError
        before any work is done."""
        if params.adapter is not None and params.adapter not in self.adapters:
            raise ValueError(f"unknown LoRA adapter {params.adapter!r}")
        vocab = self.model.cfg.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt holds token ids outside the vocabulary [0, {vocab}): "
                             f"{bad[:5]}")
        seqs = self.scheduler.add_request(request_id, list(prompt_token_ids), params)
        for seq in seqs:
            self._generators[seq.seq_id] = make_generator(params.seed, seq.index)
            if mask_provider is not None:
                self._masks[seq.seq_id] = mask_provider()

    def abort(self, request_id: str) -> None:
        """Stops a request now (client gone) and frees its KV blocks at once."""
        for seq in self.scheduler.abort(request_id):
            self._forget(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the loop --------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        out = self.scheduler.schedule()
        self.num_preemptions += len(out.preempted)
        if not out.chunks:
            return []
        logits = self._run(out.chunks)
        sampling = [c.seq for c in out.chunks if c.samples]
        sampled = self._sample(sampling, logits)
        finished = self.scheduler.update(out, {s.seq_id: t.token for s, t in zip(sampling, sampled)})
        for seq in finished:
            self._forget(seq)
        return [self._output(seq, tok) for seq, tok in zip(sampling, sampled)]

    def _run(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Model forward over the chunks -> logits [chunks that sample, V] float32."""
        ids: list[int] = []
        pos: list[int] = []
        rows: list[int] = []
        meta = []
        groups: dict[str, list[int]] = {}  # adapter -> its rows of the flat batch
        for c in chunks:
            if c.seq.params.adapter is not None:
                groups.setdefault(c.seq.params.adapter, []).extend(
                    range(len(ids), len(ids) + c.num_tokens))
            ids += c.seq.all_token_ids[c.start:c.start + c.num_tokens]
            pos += range(c.start, c.start + c.num_tokens)
            if c.samples:
                rows.append(len(ids) - 1)
            meta.append((c.start, c.num_tokens, self.kv.table(c.seq.seq_id)))
        attn = PagedAttention(self.storage, meta)
        lora = LoraBatch([(self.adapters[name], torch.tensor(r, device=self.model.device))
                          for name, r in groups.items()], len(ids)) if groups else None
        hidden = self.model.forward_flat(torch.tensor(ids), torch.tensor(pos), attn,
                                         lora)  # [N, H]
        if not rows:  # a step of prefill chunks only: nothing samples
            return torch.empty(0, self.model.cfg.vocab_size)
        return self.model.logits(hidden[rows]).cpu()

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[SampledToken]:
        if not seqs:
            return []
        masks = [self._masks[s.seq_id].allowed() if s.seq_id in self._masks else None
                 for s in seqs]
        out = sample(logits, [s.params for s in seqs], [s.output_token_ids for s in seqs],
                     [self._generators[s.seq_id] for s in seqs], masks)
        for s, tok in zip(seqs, out):
            if s.seq_id in self._masks:
                self._masks[s.seq_id].advance(tok.token)
        return out

    def _output(self, seq: Sequence, tok: SampledToken) -> StepOutput:
        appended = tok.token not in seq.params.stop_token_ids  # stop tokens are not output
        return StepOutput(
            request_id=seq.request_id, index=seq.index,
            token_ids=[tok.token] if appended else [],
            logprobs=[tok] if appended and seq.params.logprobs is not None else [],
            finished=seq.is_finished, finish_reason=seq.finish_reason,
            num_prompt_tokens=len(seq.prompt_token_ids),
            num_cached_tokens=seq.num_cached_tokens,
            num_output_tokens=len(seq.output_token_ids),
            stop_token_id=None if appended else tok.token)

    def _forget(self, seq: Sequence) -> None:
        self._generators.pop(seq.seq_id, None)
        self._masks.pop(seq.seq_id, None)

    # ---- convenience -----------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams
                 ) -> list[list[StepOutput]]:
        """Runs prompts to completion; per prompt, the outputs of each step in order."""
        results: dict[str, list[StepOutput]] = {}
        for i, p in enumerate(prompts):
            self.add_request(f"gen-{i}", p, params)
            results[f"gen-{i}"] = []
        while self.has_unfinished():
            for o in self.step():
                results[o.request_id].append(o)
        return [results[f"gen-{i}"] for i in range(len(prompts))]
