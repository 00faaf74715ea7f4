"""Scheduler driven by a fake model: chunked prefill, budgets, preemption, abort, n > 1 prefix
sharing, stop/length, and a seeded random stress test checking the KV invariants every step."""

from __future__ import annotations

import math
import random

import pytest

from ossrt.engine.kv_cache import KVCacheManager, KVCacheSpec
from ossrt.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from ossrt.engine.sequence import (ContextLengthExceeded, QueueFull, SamplingParams, Sequence,
                                   SeqStatus)

BS, W = 4, 8


def fake_token(seq: Sequence) -> int:
    return (seq.seq_id * 7 + len(seq.output_token_ids)) % 50 + 10


def make(full: int = 64, sliding: int = 32, caching: bool = True, **config: int) -> Scheduler:
    config.setdefault("max_model_len", 64)
    kv = KVCacheManager(KVCacheSpec(BS, full, sliding, sliding_window=W,
                                    enable_prefix_caching=caching))
    return Scheduler(SchedulerConfig(**config), kv)


def step(sched: Scheduler) -> tuple[SchedulerOutput, list[Sequence]]:
    out = sched.schedule()
    assert out.num_tokens <= sched.config.max_num_batched_tokens
    sampled = {c.seq.seq_id: fake_token(c.seq) for c in out.chunks if c.samples}
    return out, sched.update(out, sampled)


def run(sched: Scheduler, max_steps: int = 10_000) -> list[SchedulerOutput]:
    outs = []
    while sched.has_unfinished():
        outs.append(step(sched)[0])
        sched.kv.check_invariants()
        assert len(outs) < max_steps, "no progress"
    return outs


def params(**kw: object) -> SamplingParams:
    return SamplingParams(**kw)  # type: ignore[arg-type]


def expected_output(seq: Sequence, n: int) -> list[int]:
    return [(seq.seq_id * 7 + i) % 50 + 10 for i in range(n)]


def all_free(sched: Scheduler) -> bool:
    spec = sched.kv.spec
    return (sched.kv.num_free_blocks() == (spec.num_blocks_full, spec.num_blocks_sliding)
            and sched.kv.usage() == 0.0)


# ---- chunked prefill and budgets ---------------------------------------------------------------

def test_chunked_prefill_splits_a_long_prompt() -> None:
    sched = make(max_num_batched_tokens=16)
    (seq,) = sched.add_request("a", list(range(40)), params(max_tokens=3))
    outs = run(sched)
    chunks = [(c.start, c.num_tokens, c.samples) for o in outs for c in o.chunks]
    assert chunks == [(0, 16, False), (16, 16, False), (32, 8, True), (40, 1, True), (41, 1, True)]
    assert seq.output_token_ids == expected_output(seq, 3) and seq.finish_reason == "length"
    assert all_free(sched)


def test_decodes_are_scheduled_ahead_of_prefill_chunks() -> None:
    sched = make(max_num_batched_tokens=8, max_model_len=64)
    (a,) = sched.add_request("a", [1, 2, 3], params(max_tokens=20))
    step(sched)  # a's prompt; a decodes from now on
    (b,) = sched.add_request("b", list(range(100, 140)), params(max_tokens=2))
    for _ in range(5):  # b's 40-token prompt takes 7 tokens a step; a decodes every step
        out, _ = step(sched)
        assert [(c.seq.seq_id, c.num_tokens) for c in out.chunks] == [(a.seq_id, 1), (b.seq_id, 7)]
    assert len(a.output_token_ids) == 6 and b.num_computed_tokens == 35


def test_a_newer_decode_goes_before_an_older_prefill() -> None:
    # The n = 2 sibling (seq 1) waits for seq 0's prompt, so request q (seq 2) runs first; when
    # seq 1 prefills its uncached remainder, the decodes of seqs 0 and 2 still come first.
    sched = make(max_num_batched_tokens=3, max_model_len=40)
    s0, s1 = sched.add_request("r", list(range(11)), params(max_tokens=10, n=2))
    (q,) = sched.add_request("q", [1], params(max_tokens=10))
    orders = []
    while s1.num_computed_tokens < 11 and len(orders) < 20:
        out, _ = step(sched)
        orders.append([(c.seq.seq_id, c.start, c.num_tokens) for c in out.chunks])
    assert orders == [  # (seq_id, start, num_tokens) per chunk, budget 3
        [(0, 0, 3)], [(0, 3, 3)], [(0, 6, 3)], [(0, 9, 2), (2, 0, 1)],
        [(0, 11, 1), (2, 1, 1), (1, 8, 1)],  # seq 1: 8 cached tokens, 3 to compute
        [(0, 12, 1), (2, 2, 1), (1, 9, 1)],
        [(0, 13, 1), (1, 10, 1), (2, 3, 1)],  # seq 1's last token is a 1-token step too
    ]
    assert s1.num_cached_tokens == 8


def test_token_budget_and_max_num_seqs() -> None:
    sched = make(full=128, max_num_batched_tokens=10, max_num_seqs=3, max_model_len=64)
    seqs = [sched.add_request(f"r{i}", list(range(i, i + 7)), params(max_tokens=4))[0]
            for i in range(8)]
    most = 0
    for _ in range(1000):
        if not sched.has_unfinished():
            break
        out, _ = step(sched)
        assert out.num_tokens <= 10
        assert sched.num_running <= 3 and len(out.chunks) <= 3
        most = max(most, out.num_tokens)
    assert most == 10  # the budget is actually used up
    assert all(len(s.output_token_ids) == 4 for s in seqs) and all_free(sched)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulerConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        make(full=8, max_model_len=64)  # 64 tokens need 16 full blocks
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        make(sliding=4, max_num_batched_tokens=16)  # a 16-token chunk + window: 7 blocks


# ---- preemption --------------------------------------------------------------------------------

def test_preemption_under_a_tiny_pool_recomputes_and_finishes() -> None:
    def go(full: int, sliding: int) -> tuple[Scheduler, list[Sequence], list[SchedulerOutput]]:
        sched = make(full=full, sliding=sliding, max_num_batched_tokens=8, max_model_len=32)
        seqs = [sched.add_request(f"r{i}", [i] * 3 + list(range(7)), params(max_tokens=20))[0]
                for i in range(4)]
        outs: list[SchedulerOutput] = []
        while sched.has_unfinished():
            assert len(outs) < 1000, "no progress"
            was_running = {s.seq_id for s in sched.running}
            out = sched.schedule()
            if out.preempted:  # memory is short: nothing new is admitted in that step
                assert all(c.seq.seq_id in was_running for c in out.chunks)
            # Victims: the most recently arrived running sequences that were not scheduled.
            scheduled = {c.seq.seq_id for c in out.chunks}
            left = [s.seq_id for s in sched.running if s.seq_id not in scheduled]
            ids = [v.seq_id for v in out.preempted]
            assert ids == sorted(ids, reverse=True) and all(i > max(left, default=-1) for i in ids)
            sched.update(out, {c.seq.seq_id: fake_token(c.seq) for c in out.chunks if c.samples})
            sched.kv.check_invariants()
            outs.append(out)
        return sched, seqs, outs

    _, reference, ref_outs = go(full=64, sliding=32)
    assert not any(o.preempted for o in ref_outs)
    sched, seqs, outs = go(full=8, sliding=6)  # one sequence needs all 8 full blocks at the end
    preempted = [s for o in outs for s in o.preempted]
    assert len(preempted) >= 3 and sum(s.num_preemptions for s in seqs) == len(preempted)
    for seq, ref in zip(seqs, reference):
        assert seq.finish_reason == ref.finish_reason == "length"
        assert seq.output_token_ids == ref.output_token_ids == expected_output(seq, 20)
    assert all_free(sched)


def test_preempted_sequence_recomputes_prompt_and_outputs() -> None:
    sched = make(full=8, sliding=6, max_num_batched_tokens=8, max_model_len=32, max_num_seqs=2)
    (a,) = sched.add_request("a", list(range(10)), params(max_tokens=20))
    (b,) = sched.add_request("b", list(range(50, 60)), params(max_tokens=20))
    (c,) = sched.add_request("c", list(range(70, 80)), params(max_tokens=20))  # waits: 2 seqs
    for _ in range(100):
        out, _ = step(sched)
        if b.num_preemptions:
            break
    assert out.preempted == [b] and b.status is SeqStatus.WAITING and b.num_computed_tokens == 0
    assert sched.kv.table(b.seq_id).full == [] and sched.waiting == [b, c]  # b goes first
    kept = list(b.output_token_ids)
    assert kept  # outputs survive preemption
    # Until b samples again: its chunks since it was last (re)admitted recompute the prompt and
    # the kept outputs, starting after any prefix-cache hit, and the last one samples.
    segment: list[tuple[int, int, bool]] = []
    for _ in range(100):
        if len(b.output_token_ids) > len(kept):
            break
        out, _ = step(sched)
        if any(p is b for p in out.preempted):
            segment = []  # preempted again (the fake model's pool is tiny): starts over
        segment += [(ch.start, ch.num_tokens, ch.samples) for ch in out.chunks if ch.seq is b]
    assert segment and segment[0][0] % BS == 0 and segment[-1][2]
    assert all(s0 + n0 == s1 for (s0, n0, _), (s1, _, _) in zip(segment, segment[1:]))
    assert segment[-1][0] + segment[-1][1] == 10 + len(kept)
    assert b.output_token_ids == expected_output(b, len(kept) + 1)
    run(sched)
    for seq in (a, b, c):
        assert seq.output_token_ids == expected_output(seq, 20)
    assert all_free(sched)


def test_no_skipping_past_a_waiting_sequence_that_does_not_fit() -> None:
    sched = make(full=16, sliding=32, max_num_batched_tokens=64, max_model_len=64)
    (r,) = sched.add_request("r", list(range(40)), params(max_tokens=20))
    step(sched)  # r holds 10 of the 16 full blocks
    (a,) = sched.add_request("a", list(range(100, 130)), params(max_tokens=2))  # needs 8
    (b,) = sched.add_request("b", [1, 2, 3, 4], params(max_tokens=2))  # would fit
    out, _ = step(sched)
    assert [c.seq for c in out.chunks] == [r] and sched.waiting == [a, b]
    assert sched.kv.table(a.seq_id).full == [] and a.num_computed_tokens == 0
    run(sched)
    assert [len(s.output_token_ids) for s in (r, a, b)] == [20, 2, 2] and all_free(sched)


# ---- abort, finish, admission errors -----------------------------------------------------------

def test_abort_frees_blocks_at_once() -> None:
    sched = make(max_num_seqs=1)
    (a,) = sched.add_request("a", list(range(10)), params(max_tokens=5))
    (b,) = sched.add_request("b", list(range(10)), params(max_tokens=5))
    step(sched)
    assert a.status is SeqStatus.RUNNING and b.status is SeqStatus.WAITING
    assert sched.kv.usage() > 0
    assert sched.abort("a") == [a]
    assert a.finish_reason == "abort" and a.is_finished and all_free(sched)
    assert sched.num_running == 0
    assert sched.abort("b") == [b] and b.finish_reason == "abort"
    assert sched.num_waiting == 0 and not sched.has_unfinished()
    assert sched.abort("b") == [] and sched.abort("nope") == []


def test_abort_between_schedule_and_update() -> None:
    sched = make()
    (a,) = sched.add_request("a", list(range(10)), params(max_tokens=5))
    out = sched.schedule()
    sched.abort("a")
    assert all_free(sched)
    assert sched.update(out, {}) == [] and a.output_token_ids == []


def test_finish_from_above() -> None:
    sched = make()
    (a,) = sched.add_request("a", [1, 2, 3], params(max_tokens=50))
    step(sched)
    step(sched)
    sched.finish(a.seq_id, "stop")
    assert a.finish_reason == "stop" and not sched.has_unfinished() and all_free(sched)
    sched.finish(a.seq_id, "abort")  # already finished: left alone
    assert a.finish_reason == "stop"


def test_admission_errors_add_nothing() -> None:
    sched = make(max_queue_len=3, max_model_len=20)
    with pytest.raises(ContextLengthExceeded, match=r"15 tokens.*max_tokens=6.*20-token"):
        sched.add_request("a", list(range(15)), params(max_tokens=6))
    with pytest.raises(ContextLengthExceeded):
        sched.add_request("a", list(range(20)), params())  # no room for one output token
    with pytest.raises(ValueError, match="at least one token"):
        sched.add_request("a", [], params())
    with pytest.raises(QueueFull):
        sched.add_request("a", [1], params(n=4))
    assert sched.num_waiting == 0 and not sched.has_unfinished()
    sched.add_request("a", [1], params(n=2))
    with pytest.raises(ValueError, match="in use"):
        sched.add_request("a", [1], params())
    with pytest.raises(QueueFull):
        sched.add_request("b", [1], params(n=2))
    (c,) = sched.add_request("c", [1], params())
    assert sched.num_waiting == 3 and c.seq_id == 2  # failed requests used no ids


# ---- n > 1, stop, length -----------------------------------------------------------------------

def test_siblings_wait_for_sibling_0_then_hit_the_cache() -> None:
    sched = make(max_num_batched_tokens=64)
    seqs = sched.add_request("r", list(range(10)), params(max_tokens=3, n=3))
    out, _ = step(sched)
    assert [(c.seq.index, c.num_tokens) for c in out.chunks] == [(0, 10)]  # budget to spare
    out, _ = step(sched)
    chunks = [(c.seq.index, c.start, c.num_tokens) for c in out.chunks]
    assert chunks == [(0, 10, 1), (1, 8, 2), (2, 8, 2)]  # two cached blocks, 2 tokens computed
    assert [s.num_cached_tokens for s in seqs] == [0, 8, 8]
    run(sched)
    for seq in seqs:
        assert seq.output_token_ids == expected_output(seq, 3)
    assert all_free(sched)


def test_siblings_run_together_without_prefix_caching() -> None:
    sched = make(caching=False)
    sched.add_request("r", list(range(10)), params(max_tokens=3, n=3))
    out, _ = step(sched)
    assert [(c.seq.index, c.num_tokens) for c in out.chunks] == [(0, 10), (1, 10), (2, 10)]


def test_stop_token_finishes_without_emitting_it() -> None:
    sched = make()
    # The first sequence has id 0, so the fake model emits 10, 11, 12, 13, ...
    (seq,) = sched.add_request("a", [5, 6], params(max_tokens=10, stop_token_ids=(99, 13)))
    finished = []
    for _ in range(10):
        out, done = step(sched)
        finished += done
        assert all(c.seq is seq for c in out.chunks)
    assert finished == [seq] and seq.finish_reason == "stop"
    assert seq.output_token_ids == [10, 11, 12]  # the stop token is not emitted
    assert not sched.has_unfinished() and all_free(sched)


def test_max_tokens_and_max_model_len_finish_with_length() -> None:
    sched = make(max_model_len=16)
    (a,) = sched.add_request("a", list(range(5)), params(max_tokens=4))
    (b,) = sched.add_request("b", list(range(10)), params())  # up to the context limit
    run(sched)
    assert a.finish_reason == "length" and len(a.output_token_ids) == 4
    assert b.finish_reason == "length" and b.num_tokens == 16 and len(b.output_token_ids) == 6
    assert all_free(sched)


# ---- randomized stress -------------------------------------------------------------------------

def check_step(sched: Scheduler, out: SchedulerOutput) -> None:
    kv, cfg = sched.kv, sched.config
    kv.check_invariants()  # ref counts == table references, free == unreferenced, hash maps
    assert out.num_tokens <= cfg.max_num_batched_tokens and sched.num_running <= cfg.max_num_seqs
    sliding_bound = math.ceil((W + cfg.max_num_batched_tokens - 1) / BS) + 1
    for seq in sched.running:
        assert seq.status is SeqStatus.RUNNING
        table, computed = kv.table(seq.seq_id), seq.num_computed_tokens
        assert len(table.full) == math.ceil(computed / BS)
        first = max(0, computed - W + 1) // BS  # the keys the next query can see
        assert len(table.sliding) == len(table.full)
        assert None not in table.sliding[first:]
        assert sum(b is not None for b in table.sliding) <= sliding_bound
    for seq in sched.waiting:
        assert seq.status is SeqStatus.WAITING and kv.table(seq.seq_id).full == []


def test_modules_are_plain_python() -> None:
    import ast
    from pathlib import Path

    import ossrt.engine.kv_cache as kv_module
    import ossrt.engine.scheduler as sched_module

    for module in (kv_module, sched_module):
        tree = ast.parse(Path(str(module.__file__)).read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                    if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module and not node.level}
        assert imported <= {"__future__", "bisect", "collections", "dataclasses"}, imported


@pytest.mark.parametrize("seed", [1234, 7, 2024])
def test_random_stress(seed: int) -> None:
    rng = random.Random(seed)
    sched = make(full=24, sliding=10, max_num_batched_tokens=12, max_num_seqs=6,
                 max_queue_len=12, max_model_len=64)
    prefixes = [[rng.randrange(5) for _ in range(12)] for _ in range(3)]
    seqs: list[Sequence] = []
    counts = {"preempted": 0, "cache_hits": 0, "aborted": 0, "rejected": 0}
    for i in range(400):
        if rng.random() < 0.3:
            prompt = rng.choice(prefixes)[:rng.randrange(1, 13)] + [
                rng.randrange(50) for _ in range(rng.randrange(20))]
            p = params(max_tokens=rng.choice([None, 1, 5, 20]), n=rng.choice([1, 1, 2, 3]),
                       stop_token_ids=rng.choice([(), (11,), (12, 13)]))
            try:
                seqs += sched.add_request(f"r{i}", prompt, p)
            except (QueueFull, ContextLengthExceeded):
                counts["rejected"] += 1
        if seqs and rng.random() < 0.05:
            counts["aborted"] += len(sched.abort(rng.choice(seqs).request_id))
        if sched.running and rng.random() < 0.03:
            sched.finish(rng.choice(sched.running).seq_id, "stop")
        out, _ = step(sched)
        counts["preempted"] += len(out.preempted)
        check_step(sched, out)
    run(sched)
    counts["cache_hits"] = sum(s.num_cached_tokens > 0 for s in seqs)
    assert all(counts.values()), counts  # every path was exercised
    assert all(s.is_finished for s in seqs) and all_free(sched)
    for s in seqs:
        assert len(s.output_token_ids) <= (s.params.max_tokens or 64)
        if s.finish_reason == "stop" and s.output_token_ids:
            assert s.output_token_ids[-1] not in s.params.stop_token_ids
