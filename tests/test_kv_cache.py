"""KVCacheManager: block accounting for full and sliding pools, ref counts, LRU eviction, prefix
caching (including the sliding window's share of a hit). No model needed."""

from __future__ import annotations

import copy
import math

import pytest

from ossrt.engine.kv_cache import BlockTable, KVCacheManager, KVCacheSpec
from ossrt.engine.sequence import SamplingParams, Sequence


def make_seq(seq_id: int, tokens: list[int]) -> Sequence:
    return Sequence(seq_id, f"r{seq_id}", list(tokens), SamplingParams())


def compute(kv: KVCacheManager, seq: Sequence, upto: int, chunk: int = 1) -> None:
    """Simulates the model computing seq's positions up to `upto`, `chunk` at a time."""
    while seq.num_computed_tokens < upto:
        n = min(chunk, upto - seq.num_computed_tokens)
        assert kv.allocate_slots(seq, n)
        seq.num_computed_tokens += n
        kv.cache_blocks(seq, seq.num_computed_tokens)


def held(table: BlockTable) -> list[int]:
    return [b for b in table.sliding if b is not None]


def state(kv: KVCacheManager, *seqs: Sequence) -> object:
    return (kv.num_free_blocks(), [copy.deepcopy(kv.table(s.seq_id)) for s in seqs],
            copy.deepcopy(kv._full.__dict__), copy.deepcopy(kv._sliding.__dict__))


# ---- block counts ------------------------------------------------------------------------------

@pytest.mark.parametrize(("bs", "window", "chunk"), [
    (4, 16, 1), (4, 16, 5), (4, 16, 16), (8, 3, 1), (16, 128, 1), (16, 128, 64)])
def test_block_counts_while_growing(bs: int, window: int, chunk: int) -> None:
    spec = KVCacheSpec(bs, num_blocks_full=1000, num_blocks_sliding=100, sliding_window=window)
    kv = KVCacheManager(spec)
    length = 10 * window
    seq = make_seq(0, list(range(length)))
    bound = math.ceil((window + chunk - 1) / bs) + 1
    most = 0
    while seq.num_computed_tokens < length:
        start = seq.num_computed_tokens
        n = min(chunk, length - start)
        assert kv.allocate_slots(seq, n)
        table = kv.table(seq.seq_id)
        end = start + n
        assert len(table.full) == math.ceil(end / bs)  # full pool: every position
        first = max(0, start - window + 1) // bs  # sliding: what the new queries can see
        assert all(b is None for b in table.sliding[:first])
        assert all(b is not None for b in table.sliding[first:])
        assert len(table.sliding) == math.ceil(end / bs)
        most = max(most, len(held(table)))
        assert len(held(table)) <= bound
        assert kv.num_free_blocks() == (1000 - len(table.full), 100 - len(held(table)))
        seq.num_computed_tokens = end
        kv.cache_blocks(seq, end)
    kv.check_invariants()
    assert most <= KVCacheManager.blocks_per_sequence(spec, length, chunk)[1] <= bound
    if chunk == 1:  # decoding reaches the bound: the window plus one block (W >= bs)
        assert most == KVCacheManager.blocks_per_sequence(spec, length, 1)[1]
        if window >= bs:
            assert most == math.ceil(window / bs) + 1
    kv.free(seq)
    assert kv.num_free_blocks() == (1000, 100) and kv.usage() == 0.0


def test_out_of_window_sliding_blocks_are_released_exactly() -> None:
    kv = KVCacheManager(KVCacheSpec(4, 10, 10, sliding_window=8))
    seq = make_seq(0, list(range(20)))
    assert kv.allocate_slots(seq, 12)  # positions 0..11: blocks 0..2 in both pools
    seq.num_computed_tokens = 12
    before = list(kv.table(0).sliding)
    assert kv.allocate_slots(seq, 1)  # query 12 sees keys 5..12: block 0 is out of window
    table = kv.table(0)
    assert table.sliding[:3] == [None] + before[1:]
    assert len(table.sliding) == 4 and table.sliding[3] is not None
    assert kv.num_free_blocks() == (10 - 4, 10 - 3)
    kv.check_invariants()


def test_blocks_per_sequence_at_20b_shape() -> None:
    spec = KVCacheSpec(16, 10_000, 1_000, sliding_window=128)
    assert KVCacheManager.blocks_per_sequence(spec, 131_072) == (8192, 9)
    assert KVCacheManager.blocks_per_sequence(spec, 131_072, chunk=2048) == (8192, 137)
    assert KVCacheManager.blocks_per_sequence(spec, 20) == (2, 2)  # capped by the length
    no_sliding = KVCacheSpec(16, 10, 0, sliding_window=None)
    assert KVCacheManager.blocks_per_sequence(no_sliding, 100) == (7, 0)


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="block_size"):
        KVCacheSpec(0, 1, 0, None)
    with pytest.raises(ValueError, match="sliding_window"):
        KVCacheSpec(4, 1, 1, None)
    with pytest.raises(ValueError, match="sliding_window"):
        KVCacheSpec(4, 1, 0, 8)
    with pytest.raises(ValueError, match="at least one pool"):
        KVCacheSpec(4, 0, 0, None)


def test_single_pool_models() -> None:
    full_only = KVCacheManager(KVCacheSpec(4, 8, 0, None))
    seq = make_seq(0, list(range(10)))
    compute(full_only, seq, 9, chunk=3)
    assert full_only.table(0).full and full_only.table(0).sliding == []
    full_only.free(seq)
    assert full_only.get_computed_blocks(make_seq(1, list(range(10)))) == 8
    sliding_only = KVCacheManager(KVCacheSpec(4, 0, 4, sliding_window=4))
    seq = make_seq(0, list(range(40)))
    compute(sliding_only, seq, 39)
    assert sliding_only.table(0).full == [] and len(held(sliding_only.table(0))) <= 3
    sliding_only.check_invariants()


# ---- allocation failure ------------------------------------------------------------------------

def test_allocate_failure_changes_nothing() -> None:
    kv = KVCacheManager(KVCacheSpec(4, 4, 4, sliding_window=4))
    seq = make_seq(0, list(range(30)))
    assert kv.allocate_slots(seq, 16)  # all 4 full and 4 sliding blocks
    seq.num_computed_tokens = 16
    snapshot = state(kv, seq)
    # Needs a 5th full block: fails, and the 3 out-of-window sliding blocks are NOT released.
    assert not kv.allocate_slots(seq, 1)
    assert state(kv, seq) == snapshot
    other = make_seq(1, [1, 2, 3])
    assert not kv.allocate_slots(other, 1)
    assert state(kv, seq) == snapshot and kv.table(1) == BlockTable()
    kv.check_invariants()


def test_releasing_out_of_window_blocks_makes_room() -> None:
    kv = KVCacheManager(KVCacheSpec(4, 8, 4, sliding_window=4))
    seq = make_seq(0, list(range(30)))
    assert kv.allocate_slots(seq, 16)
    seq.num_computed_tokens = 16
    assert kv.num_free_blocks() == (4, 0)
    assert kv.allocate_slots(seq, 4)  # keys 13..19: releases sliding blocks 0..2, needs block 4
    table = kv.table(0)
    assert table.sliding[:3] == [None, None, None] and None not in table.sliding[3:]
    assert len(table.sliding) == len(table.full) == 5
    assert kv.num_free_blocks() == (3, 2)
    kv.check_invariants()


def test_shared_out_of_window_block_does_not_count_as_free() -> None:
    kv = KVCacheManager(KVCacheSpec(4, 10, 4, sliding_window=8))
    a = make_seq(0, list(range(20)))
    compute(kv, a, 12, chunk=12)  # a holds sliding blocks 0, 1, 2
    b = make_seq(1, list(range(20)))
    assert kv.get_computed_blocks(b) == 12  # b shares blocks 1, 2 (keys 5..11), not block 0
    assert kv.table(1).sliding == [None, *kv.table(0).sliding[1:]]
    compute(kv, b, 15, chunk=3)  # b takes the last free sliding block (3)
    assert kv.num_free_blocks()[1] == 0 and kv.table(1).sliding[1] is not None
    snapshot = state(kv, a, b)
    # Queries 15, 16 see keys 8..16: b's block 1 is out of its window, but a still holds it,
    # so releasing it frees nothing and block 4 cannot be had.
    assert not kv.allocate_slots(b, 2)
    assert state(kv, a, b) == snapshot
    kv.free(a)  # now a's block 0 is free, and b's release of block 1 frees it too
    assert kv.allocate_slots(b, 2)
    assert kv.table(1).sliding[:2] == [None, None] and kv.num_free_blocks()[1] == 1
    kv.check_invariants()


# ---- ref counts, eviction ----------------------------------------------------------------------

def test_shared_blocks_are_freed_by_the_last_holder() -> None:
    kv = KVCacheManager(KVCacheSpec(4, 8, 8, sliding_window=8))
    a = make_seq(0, list(range(13)))
    compute(kv, a, 12, chunk=12)
    b = make_seq(1, list(range(13)))
    assert kv.get_computed_blocks(b) == 12
    assert kv.table(1).full == kv.table(0).full
    assert kv.num_free_blocks() == (5, 5)  # b needs sliding blocks 1, 2 only (keys 5..11)
    kv.free(a)
    assert kv.num_free_blocks() == (5, 6)  # only sliding block 0 was a's alone
    kv.check_invariants()
    kv.free(b)
    assert kv.num_free_blocks() == (8, 8) and kv.usage() == 0.0
    kv.check_invariants()


def test_eviction_is_lru_and_tail_first() -> None:
    kv = KVCacheManager(KVCacheSpec(4, 4, 4, sliding_window=8))
    a, b = make_seq(0, [1] * 9), make_seq(1, [2] * 9)
    for seq in (a, b):
        compute(kv, seq, 8, chunk=8)
        kv.free(seq)  # both blocks stay cached, evictable
    assert kv.num_free_blocks() == (4, 4) and kv.usage() == 0.0
    # LRU order: a1, a0, b1, b0 (a freed first; a sequence's tail block before its head).
    c = make_seq(2, [3] * 9)
    assert kv.allocate_slots(c, 1)  # evicts a1
    assert hit(kv, [1] * 9) == 4  # a0 still hits; reviving and freeing it makes it the newest
    assert kv.allocate_slots(c, 5)  # one more block: evicts b1, not a0
    assert hit(kv, [2] * 9) == 4
    assert hit(kv, [1] * 9) == 4
    assert kv.allocate_slots(c, 9)  # evicts b0: the last hit touched a0 after it
    assert hit(kv, [2] * 9) == 0
    assert hit(kv, [1] * 9) == 4
    kv.check_invariants()


def test_revived_blocks_are_the_cached_ones() -> None:
    kv = KVCacheManager(KVCacheSpec(4, 6, 6, sliding_window=8))
    a = make_seq(0, list(range(10)))
    compute(kv, a, 10, chunk=10)
    ids = list(kv.table(0).full[:2])
    kv.free(a)
    assert kv.usage() == 0.0
    b = make_seq(1, list(range(10)) + [99])
    assert kv.get_computed_blocks(b) == 8
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert kv.table(1).full == ids  # same physical blocks, no recompute
    assert kv.num_free_blocks() == (4, 4)  # revived: referenced again
    kv.check_invariants()


def test_uncached_free_blocks_are_used_before_evicting() -> None:
    kv = KVCacheManager(KVCacheSpec(4, 4, 4, sliding_window=8))
    a = make_seq(0, list(range(9)))
    compute(kv, a, 8, chunk=8)
    kv.free(a)
    c = make_seq(1, [7] * 8)
    assert kv.allocate_slots(c, 8)  # 2 never-used blocks are free: no eviction
    assert kv.get_computed_blocks(make_seq(2, list(range(9)))) == 8


# ---- prefix hits -------------------------------------------------------------------------------

def cached_kv(tokens: list[int], window: int = 8, chunk: int = 64, blocks: int = 32,
              sliding_blocks: int = 32, upto: int | None = None) -> KVCacheManager:
    """A cache holding what one sequence of `tokens` left behind (computed up to `upto`)."""
    kv = KVCacheManager(KVCacheSpec(4, blocks, sliding_blocks, sliding_window=window))
    seq = make_seq(0, tokens)
    compute(kv, seq, len(tokens) if upto is None else upto, chunk)
    kv.free(seq)
    return kv


def hit(kv: KVCacheManager, tokens: list[int], seq_id: int = 100) -> int:
    seq = make_seq(seq_id, tokens)
    n = kv.get_computed_blocks(seq)
    assert seq.num_computed_tokens == n
    kv.check_invariants()
    kv.free(seq)
    return n


def test_prefix_hit_lengths() -> None:
    base = list(range(100, 116))  # 4 full blocks
    kv = cached_kv(base)
    assert hit(kv, base + [1, 2]) == 16  # whole cached prefix
    assert hit(kv, base) == 12  # capped: at least one token is computed
    assert hit(kv, base[:9]) == 8
    assert hit(kv, base[:6] + [0] * 10) == 4  # partial: diverges in block 1
    assert hit(kv, [0] + base[1:]) == 0
    assert hit(kv, base[:3]) == 0


def test_hash_chain_needs_the_same_prefix() -> None:
    kv = cached_kv([1, 2, 3, 4, 5, 6, 7, 8, 9])
    # Block 1's tokens are cached, but after a different block 0: no hit for either.
    assert hit(kv, [0, 2, 3, 4, 5, 6, 7, 8, 9]) == 0


@pytest.mark.parametrize(("evicted", "expected"), [
    (0, 24), (1, 20), (2, 16), (3, 12), (4, 8), (5, 4), (6, 0)])
def test_hit_needs_the_sliding_blocks_of_the_window(evicted: int, expected: int) -> None:
    tokens = list(range(25))
    # One 24-token chunk: all 6 sliding blocks are held when the sequence is freed, so they
    # become evictable tail first: 5, 4, 3, 2, 1, 0. Full blocks stay cached (big pool).
    kv = cached_kv(tokens, window=8, chunk=24, blocks=32, sliding_blocks=6, upto=24)
    if evicted:
        assert kv.allocate_slots(make_seq(1, [999] * 30), 4 * evicted)
    # A hit of P tokens needs sliding blocks covering keys P-7..P-1: P = 24 needs blocks 4, 5;
    # P = 20 needs 3, 4; ... P = 4 needs block 0.
    seq = make_seq(2, tokens)
    assert kv.get_computed_blocks(seq) == expected
    table = kv.table(2)
    first = max(0, expected - 7) // 4
    assert len(table.full) == expected // 4
    assert table.sliding[:first] == [None] * first
    assert len(table.sliding) == expected // 4 and None not in table.sliding[first:]
    kv.check_invariants()
    if expected:  # the hit's table is a valid start for the next allocation
        kv.free(make_seq(1, []))  # (the filler may hold the rest of the sliding pool)
        assert kv.allocate_slots(seq, 1)
        assert kv.table(2).sliding[:first] == [None] * first
        kv.check_invariants()


def test_decoded_sequence_releases_early_sliding_blocks_but_they_stay_cached() -> None:
    tokens = list(range(33))
    kv = cached_kv(tokens, window=8, chunk=1)  # decoded one token at a time
    assert hit(kv, tokens) == 32
    assert hit(kv, tokens[:10] + [0] * 20) == 8  # early window: released blocks still cached


def test_prefix_caching_off() -> None:
    kv = KVCacheManager(KVCacheSpec(4, 8, 8, sliding_window=8, enable_prefix_caching=False))
    a = make_seq(0, list(range(9)))
    compute(kv, a, 9, chunk=9)
    kv.free(a)
    b = make_seq(1, list(range(9)))
    assert kv.get_computed_blocks(b) == 0 and b.num_computed_tokens == 0
    assert kv._full.cached == {} and kv._sliding.cached == {}
    kv.check_invariants()


def test_lookup_requires_an_empty_table() -> None:
    kv = KVCacheManager(KVCacheSpec(4, 8, 8, sliding_window=8))
    seq = make_seq(0, list(range(9)))
    assert kv.allocate_slots(seq, 4)
    with pytest.raises(ValueError, match="already holds"):
        kv.get_computed_blocks(seq)
