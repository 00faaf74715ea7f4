"""Continuous batching with chunked prefill (vLLM-v1 style). Plain Python: no model, no torch.

Each step: `schedule()` picks what to compute under a token budget, the model runs it, `update()`
records the sampled tokens. Every step has one token budget (max_num_batched_tokens) shared by
decodes (1 token each) and prefill chunks, so a long prompt is split over several steps and never
stalls the running decodes, which are scheduled first.

When the KV cache runs out, the most recently arrived running sequence is preempted: its blocks
are freed and it goes back to the front of the waiting queue to recompute prompt + output so far
(its output tokens are kept; the prefix cache usually makes the recompute cheap).

Sequence lifecycle: WAITING -> RUNNING -> FINISHED, with RUNNING -> WAITING on preemption. The
caller alternates schedule() and update(out, ...); abort() and finish() may come at any time.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from .kv_cache import KVCacheManager
from .sequence import ContextLengthExceeded, QueueFull, SamplingParams, Sequence, SeqStatus


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # running sequences at once
    max_num_batched_tokens: int = 2048  # tokens computed per step (prefill chunks + decodes)
    max_queue_len: int = 1024  # waiting sequences; beyond -> QueueFull
    max_model_len: int = 131072  # prompt + output tokens of one sequence

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_queue_len", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


@dataclass
class ScheduledChunk:
    """Positions [start, start + num_tokens) of `seq` are computed this step."""

    seq: Sequence
    start: int  # == seq.num_computed_tokens when scheduled
    num_tokens: int
    _samples: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._samples = self.start + self.num_tokens == self.seq.num_tokens

    @property
    def samples(self) -> bool:
        """True iff this chunk reaches the last token, so a new token is sampled after it.
        Fixed when scheduled (update() appending the token does not change it)."""
        return self._samples


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk]  # running decodes first, then prefill chunks, then new arrivals
    preempted: list[Sequence]  # evicted this step: KV freed, back in the waiting queue

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        # A sequence alone must always fit, or preemption could not guarantee progress.
        need = KVCacheManager.blocks_per_sequence(
            kv.spec, config.max_model_len, config.max_num_batched_tokens)
        have = (kv.spec.num_blocks_full, kv.spec.num_blocks_sliding)
        if need[0] > have[0] or need[1] > have[1]:
            raise ValueError(
                f"the KV cache (full, sliding) = {have} blocks cannot hold one sequence of "
                f"max_model_len={config.max_model_len} tokens computed in chunks of "
                f"{config.max_num_batched_tokens}: that needs {need}")
        self.config = config
        self.kv = kv
        self.waiting: list[Sequence] = []  # admission order; preempted ones go to the front
        self.running: list[Sequence] = []  # sorted by seq_id (= arrival order)
        self._requests: dict[str, list[Sequence]] = {}  # unfinished requests -> all their seqs
        self._seqs: dict[int, Sequence] = {}  # unfinished sequences
        self._siblings_released: set[str] = set()  # n > 1: sibling 0 has computed the prompt
        self._next_seq_id = 0

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- requests ---------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: list[int],
                    params: SamplingParams) -> list[Sequence]:
        """Queues params.n sequences (index 0..n-1). Raises ValueError (empty prompt, request id
        in use), ContextLengthExceeded or QueueFull; nothing is added on error."""
        if not prompt:
            raise ValueError("the prompt must hold at least one token")
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        limit = self.config.max_model_len
        if len(prompt) + (params.max_tokens or 1) > limit:
            raise ContextLengthExceeded(
                f"prompt of {len(prompt)} tokens plus max_tokens={params.max_tokens} exceeds "
                f"the {limit}-token context limit")
        if len(self.waiting) + params.n > self.config.max_queue_len:
            raise QueueFull(f"the waiting queue is full ({self.config.max_queue_len} sequences)")
        seqs = []
        for index in range(params.n):
            seq = Sequence(self._next_seq_id, request_id, list(prompt), params, index=index)
            self._next_seq_id += 1
            self._seqs[seq.seq_id] = seq
            seqs.append(seq)
        self._requests[request_id] = seqs
        self.waiting.extend(seqs)
        return seqs

    def abort(self, request_id: str) -> list[Sequence]:
        """Finishes all unfinished sequences of the request ("abort") and frees their blocks now.
        Returns them; [] for an unknown (or already finished) request."""
        seqs = [s for s in self._requests.get(request_id, []) if not s.is_finished]
        for seq in seqs:
            self._finish(seq, "abort")
        return seqs

    def finish(self, seq_id: int, reason: str) -> None:
        """Finishes one sequence from above (e.g. the text layer saw a stop string). A sequence
        that already finished (or an unknown id) is left alone: the two can race."""
        seq = self._seqs.get(seq_id)
        if seq is not None:
            self._finish(seq, reason)

    # ---- the step -------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Picks this step's chunks within the token budget; allocates their KV slots, and
        preempts (most recently arrived first) when the cache cannot supply them."""
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Sequence] = []
        scheduled: set[int] = set()

        # 1. Running sequences: decodes first, then unfinished prompts, each in arrival order.
        order = sorted(self.running, key=lambda s: (s.num_tokens - s.num_computed_tokens > 1,
                                                    s.seq_id))
        for seq in order:
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:  # preempted earlier in this loop
                continue
            num = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.kv.allocate_slots(seq, num):
                # The most recently arrived running sequence not yet scheduled (maybe seq).
                victim = next(s for s in reversed(self.running) if s.seq_id not in scheduled)
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num))
                scheduled.add(seq.seq_id)
                budget -= num

        # 2. Waiting sequences, in order; none after a preemption (memory is short this step).
        i = 0
        while (not preempted and budget > 0 and i < len(self.waiting)
               and len(self.running) < self.config.max_num_seqs):
            seq = self.waiting[i]
            if self._waits_for_sibling(seq):
                i += 1  # not eligible yet; keeps its place in the queue
                continue
            self.kv.get_computed_blocks(seq)  # it holds no blocks: look the prefix up
            num = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.kv.allocate_slots(seq, num):
                self.kv.free(seq)  # give back the revived prefix blocks; retried next step
                seq.num_computed_tokens = 0
                break  # no skipping ahead: the head of the queue must not starve
            del self.waiting[i]
            seq.status = SeqStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.seq_id)
            chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num))
            budget -= num
        return SchedulerOutput(chunks, preempted)

    def update(self, out: SchedulerOutput, sampled: dict[int, int]) -> list[Sequence]:
        """Records a step: advances the computed counts, registers full blocks with the prefix
        cache, and appends sampled[seq_id] for each chunk that samples. A stop token finishes the
        sequence ("stop") and is not appended; max_tokens or max_model_len finish it ("length").
        Sequences finished (e.g. aborted) since schedule() are skipped. Returns those finished
        by this step; their blocks are freed."""
        finished = []
        for chunk in out.chunks:
            seq = chunk.seq
            if seq.is_finished:
                continue
            if seq.status is not SeqStatus.RUNNING or chunk.start != seq.num_computed_tokens:
                raise RuntimeError(f"sequence {seq.seq_id}: stale scheduler output")
            seq.num_computed_tokens += chunk.num_tokens
            self.kv.cache_blocks(seq, seq.num_computed_tokens)
            if seq.index == 0 and seq.num_computed_tokens >= len(seq.prompt_token_ids):
                self._siblings_released.add(seq.request_id)
            if not chunk.samples:
                continue
            token = sampled[seq.seq_id]
            params = seq.params
            if token in params.stop_token_ids:
                self._finish(seq, "stop")
            else:
                seq.output_token_ids.append(token)
                if ((params.max_tokens is not None
                     and len(seq.output_token_ids) >= params.max_tokens)
                        or seq.num_tokens >= self.config.max_model_len):
                    self._finish(seq, "length")
            if seq.is_finished:
                finished.append(seq)
        return finished

    # ---- internals ------------------------------------------------------------------------

    def _waits_for_sibling(self, seq: Sequence) -> bool:
        """n > 1 shares the prompt through the prefix cache: siblings 1..n-1 wait until sibling
        0 has computed the whole prompt (or finished), then hit its cached blocks."""
        return (seq.index > 0 and self.kv.spec.enable_prefix_caching
                and seq.request_id not in self._siblings_released)

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self.running = [s for s in self.running if s is not seq]
        self.waiting.insert(0, seq)

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.status is SeqStatus.RUNNING:
            self.running = [s for s in self.running if s is not seq]
        elif seq.status is SeqStatus.WAITING:
            self.waiting = [s for s in self.waiting if s is not seq]
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        self.kv.free(seq)
        del self._seqs[seq.seq_id]
        if seq.index == 0:
            self._siblings_released.add(seq.request_id)
        siblings = self._requests[seq.request_id]
        if all(s.is_finished for s in siblings):
            del self._requests[seq.request_id]
            self._siblings_released.discard(seq.request_id)
