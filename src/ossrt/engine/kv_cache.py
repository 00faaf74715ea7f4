"""Paged KV cache bookkeeping: block ids, reference counts and the prefix cache. Plain Python.

gpt-oss alternates full-attention and sliding-window layers, so there are two block pools
("groups"). A physical block holds `block_size` token positions for every layer of its group; the
tensors live with the model runner, this module only hands out block ids.

- full pool: a sequence of L computed tokens holds blocks for positions 0..L-1.
- sliding pool: key j is visible to query i iff i - W < j <= i, so a step computing queries from
  position c on needs keys from max(0, c - W + 1) on. Blocks wholly before that are released (the
  table keeps None there), so a sequence holds about W / block_size + 1 sliding blocks at most.

Prefix caching: a completely filled block is registered under a chain hash
hash((parent_hash, tokens of the block)), so equal hashes mean equal whole prefixes. A block whose
reference count drops to 0 stays findable ("evictable", LRU) until its id is needed again. A hit of
P = k * block_size tokens needs full blocks 0..k-1 and the sliding blocks covering
[max(0, P - W + 1), P): the keys the first recomputed query P can see.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from .sequence import Sequence


@dataclass(frozen=True, slots=True)
class KVCacheSpec:
    block_size: int
    num_blocks_full: int  # 0 if the model has no full-attention layers
    num_blocks_sliding: int  # 0 if the model has no sliding layers
    sliding_window: int | None  # W; None if (and only if) there are no sliding layers
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.block_size < 1:
            problems.append("block_size must be >= 1")
        if self.num_blocks_full < 0 or self.num_blocks_sliding < 0:
            problems.append("block counts must be >= 0")
        if self.num_blocks_full + self.num_blocks_sliding == 0:
            problems.append("at least one pool must have blocks")
        if (self.num_blocks_sliding > 0) != (self.sliding_window is not None):
            problems.append("sliding_window must be set iff num_blocks_sliding > 0")
        if self.sliding_window is not None and self.sliding_window < 1:
            problems.append("sliding_window must be >= 1")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class BlockTable:
    full: list[int] = field(default_factory=list)  # logical block i -> physical id (full pool)
    sliding: list[int | None] = field(default_factory=list)  # None: released (out of window)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class _BlockPool:
    """One pool of block ids. Every id is in exactly one state:

    referenced (ref > 0) | free (ref 0, no hash; in `free_ids`) | evictable (ref 0, hashed; in
    `evictable`, least recently released first). `cached` maps hash -> the one block holding it.
    """

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref = [0] * num_blocks
        self.hash: list[int | None] = [None] * num_blocks
        self.free_ids: deque[int] = deque(range(num_blocks))
        self.evictable: OrderedDict[int, None] = OrderedDict()
        self.cached: dict[int, int] = {}

    def num_free(self) -> int:
        return len(self.free_ids) + len(self.evictable)

    def allocate(self) -> int:
        """A block with ref 1. Uncached free blocks go first, then the LRU evictable one."""
        if self.free_ids:
            bid = self.free_ids.popleft()
        else:
            bid, _ = self.evictable.popitem(last=False)
            del self.cached[self.hash[bid]]  # type: ignore[arg-type]
            self.hash[bid] = None
        self.ref[bid] = 1
        return bid

    def touch(self, bid: int) -> None:
        """One more reference to a cached block, reviving it if it was evictable."""
        if self.ref[bid] == 0:
            del self.evictable[bid]
        self.ref[bid] += 1

    def release(self, bid: int) -> None:
        if self.ref[bid] <= 0:
            raise RuntimeError(f"block {bid} released more often than referenced")
        self.ref[bid] -= 1
        if self.ref[bid] == 0:
            if self.hash[bid] is None:
                self.free_ids.append(bid)
            else:
                self.evictable[bid] = None  # most recently released: evicted last

    def register(self, bid: int, block_hash: int) -> None:
        """Makes `bid` findable by its content hash. The first block to hold a hash keeps it."""
        if self.hash[bid] is None and block_hash not in self.cached:
            self.hash[bid] = block_hash
            self.cached[block_hash] = bid


@dataclass
class _SeqBlocks:
    table: BlockTable = field(default_factory=BlockTable)
    hashes: list[int] = field(default_factory=list)  # chain hashes of its leading full blocks
    num_registered: int = 0  # logical blocks already offered to the prefix cache
    sliding_lo: int = 0  # sliding entries below this index are all None


class KVCacheManager:
    """Hands out block ids per sequence (keyed by seq_id). Not thread-safe."""

    def __init__(self, spec: KVCacheSpec) -> None:
        self.spec = spec
        self._full = _BlockPool(spec.num_blocks_full)
        self._sliding = _BlockPool(spec.num_blocks_sliding)
        self._seqs: dict[int, _SeqBlocks] = {}

    # ---- queries -------------------------------------------------------------------------

    def table(self, seq_id: int) -> BlockTable:
        """The live table of a sequence (do not mutate); an empty one if it holds no blocks."""
        state = self._seqs.get(seq_id)
        return state.table if state is not None else BlockTable()

    def num_free_blocks(self) -> tuple[int, int]:
        """(full, sliding) blocks available to allocations, evictable cached blocks included."""
        return self._full.num_free(), self._sliding.num_free()

    def usage(self) -> float:
        """Fraction of all blocks (both pools) that are referenced by some sequence."""
        total = self._full.num_blocks + self._sliding.num_blocks
        return (total - sum(self.num_free_blocks())) / total

    @staticmethod
    def blocks_per_sequence(spec: KVCacheSpec, num_tokens: int, chunk: int = 1) -> tuple[int, int]:
        """Most blocks (full, sliding) one sequence of num_tokens holds when computed in chunks of
        at most `chunk` tokens. A step holds the sliding keys [start - W + 1, start + chunk): a
        range of R = W - 1 + chunk positions, which spans at most ceil((R - 1) / bs) + 1 blocks.
        """
        bs = spec.block_size
        total = _ceil_div(num_tokens, bs)
        full = total if spec.num_blocks_full > 0 else 0
        sliding = 0
        if spec.sliding_window is not None:
            span = spec.sliding_window - 1 + max(1, chunk)
            sliding = min(total, _ceil_div(span - 1, bs) + 1)
        return full, sliding

    # ---- prefix cache ----------------------------------------------------------------------

    def get_computed_blocks(self, seq: Sequence) -> int:
        """Prefix-cache lookup for a sequence holding no blocks. Attaches the longest usable hit
        (ref counts +1, evictable blocks revived) and sets seq.num_computed_tokens to its length
        P, a multiple of block_size below len(seq.all_token_ids), and seq.num_cached_tokens to
        min(P, prompt length). Returns P (0 when prefix caching is off)."""
        if seq.seq_id in self._seqs:
            raise ValueError(f"sequence {seq.seq_id} already holds blocks")
        seq.num_computed_tokens = seq.num_cached_tokens = 0
        if not self.spec.enable_prefix_caching:
            return 0
        bs, window = self.spec.block_size, self.spec.sliding_window
        hashes = _chain_hashes(seq, bs, [], (seq.num_tokens - 1) // bs)  # P < num_tokens
        k_max = len(hashes)
        if self._full.num_blocks > 0:  # full blocks 0..k-1 must all be cached
            k_max = next((i for i, h in enumerate(hashes) if h not in self._full.cached), k_max)
        best, last_missing = 0, -1
        for k in range(1, k_max + 1):
            if window is None:
                best = k
                continue
            if hashes[k - 1] not in self._sliding.cached:
                last_missing = k - 1
            if last_missing < _first_sliding_block(k * bs, window, bs):
                best = k
        first = _first_sliding_block(best * bs, window, bs) if window is not None else 0
        state = self._seqs[seq.seq_id] = _SeqBlocks(
            hashes=hashes, num_registered=best, sliding_lo=first)
        if self._full.num_blocks > 0:
            for h in hashes[:best]:
                bid = self._full.cached[h]
                self._full.touch(bid)
                state.table.full.append(bid)
        if window is not None:
            state.table.sliding = [None] * first
            for h in hashes[first:best]:
                bid = self._sliding.cached[h]
                self._sliding.touch(bid)
                state.table.sliding.append(bid)
        seq.num_computed_tokens = best * bs
        seq.num_cached_tokens = min(best * bs, len(seq.prompt_token_ids))
        return best * bs

    def cache_blocks(self, seq: Sequence, num_computed_tokens: int) -> None:
        """After KV up to num_computed_tokens is computed: registers the chain hash of every
        newly completed block in each pool where the sequence still holds it."""
        state = self._seqs.get(seq.seq_id)
        if state is None or not self.spec.enable_prefix_caching:
            return
        num_full = num_computed_tokens // self.spec.block_size
        if num_full <= state.num_registered:
            return
        _chain_hashes(seq, self.spec.block_size, state.hashes, num_full)
        table = state.table
        for i in range(state.num_registered, num_full):
            if i < len(table.full):
                self._full.register(table.full[i], state.hashes[i])
            if i < len(table.sliding) and (bid := table.sliding[i]) is not None:
                self._sliding.register(bid, state.hashes[i])
        state.num_registered = num_full

    # ---- allocation ------------------------------------------------------------------------

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Extends seq's table to cover positions [0, c + num_new_tokens) in the full pool and
        [max(0, c - W + 1), c + num_new_tokens) in the sliding pool, c = seq.num_computed_tokens,
        releasing sliding blocks wholly before that range. All or nothing: returns False and
        changes nothing when a pool cannot supply the blocks."""
        if num_new_tokens < 1:
            raise ValueError("num_new_tokens must be >= 1")
        bs, window = self.spec.block_size, self.spec.sliding_window
        state = self._seqs.get(seq.seq_id)
        if state is None:
            state = _SeqBlocks()
        table = state.table
        computed = seq.num_computed_tokens
        num_blocks = _ceil_div(computed + num_new_tokens, bs)
        need_full = max(0, num_blocks - len(table.full)) if self._full.num_blocks > 0 else 0
        if need_full > self._full.num_free():
            return False
        stale: list[tuple[int, int]] = []  # (logical index, block id) of out-of-window blocks
        need_sliding = first = 0
        if window is not None:
            first = _first_sliding_block(computed, window, bs)
            lo, held = state.sliding_lo, table.sliding  # O(window) work, not O(length)
            stale = [(i, held[i]) for i in range(lo, min(first, len(held))) if held[i] is not None]
            if any(held[i] is None for i in range(max(lo, first), len(held))):
                raise RuntimeError(f"sequence {seq.seq_id}: hole in its sliding window")
            need_sliding = max(0, num_blocks - max(first, len(table.sliding)))
            released = sum(1 for _, bid in stale if self._sliding.ref[bid] == 1)
            if need_sliding > self._sliding.num_free() + released:
                return False
        # Committed: nothing below can fail.
        self._seqs[seq.seq_id] = state
        table.full.extend(self._full.allocate() for _ in range(need_full))
        if window is not None:
            for i, bid in stale:
                self._sliding.release(bid)
                table.sliding[i] = None
            table.sliding.extend([None] * (first - len(table.sliding)))
            state.sliding_lo = max(state.sliding_lo, first)
            table.sliding.extend(self._sliding.allocate() for _ in range(need_sliding))
        return True

    def free(self, seq: Sequence) -> None:
        """Releases all of seq's blocks, last block first (so a prefix's tail is evicted before
        its head). Blocks with a hash stay findable until their id is reused."""
        state = self._seqs.pop(seq.seq_id, None)
        if state is None:
            return
        for bid in reversed(state.table.full):
            self._full.release(bid)
        for sbid in reversed(state.table.sliding):
            if sbid is not None:
                self._sliding.release(sbid)

    # ---- debugging -------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raises AssertionError if the bookkeeping is inconsistent (used by tests)."""
        for name, pool, tables in (
            ("full", self._full, [s.table.full for s in self._seqs.values()]),
            ("sliding", self._sliding, [s.table.sliding for s in self._seqs.values()]),
        ):
            refs = [0] * pool.num_blocks
            for ids in tables:
                for bid in ids:
                    if bid is not None:
                        refs[bid] += 1
            assert refs == pool.ref, f"{name}: ref counts differ from the tables"
            free, evictable = set(pool.free_ids), set(pool.evictable)
            assert len(free) == len(pool.free_ids), f"{name}: duplicate free ids"
            assert not free & evictable, f"{name}: a block both free and evictable"
            unreferenced = {b for b in range(pool.num_blocks) if pool.ref[b] == 0}
            assert free | evictable == unreferenced, f"{name}: free set != unreferenced blocks"
            assert all(pool.hash[b] is None for b in free), f"{name}: a free block has a hash"
            assert all(pool.hash[b] is not None for b in evictable), f"{name}: unhashed evictable"
            assert pool.cached == {h: b for b, h in enumerate(pool.hash) if h is not None}, (
                f"{name}: hash map inconsistent"
            )


def _first_sliding_block(position: int, window: int, block_size: int) -> int:
    """Index of the first block holding a key that a query at `position` (or later) can see."""
    return max(0, position - window + 1) // block_size


def _chain_hashes(seq: Sequence, block_size: int, hashes: list[int], n: int) -> list[int]:
    """Extends `hashes` (in place) to the chain hashes of the first n full blocks of seq's tokens
    (prompt then output), without copying the whole token list."""
    prompt, output = seq.prompt_token_ids, seq.output_token_ids
    for i in range(len(hashes), n):
        lo, hi = i * block_size, (i + 1) * block_size
        if hi <= len(prompt):
            tokens = prompt[lo:hi]
        else:
            tokens = prompt[lo:] + output[max(0, lo - len(prompt)):hi - len(prompt)]
        # the first block's parent is the adapter: the same tokens under another LoRA adapter
        # have other keys and values, so they must never share blocks
        parent = hashes[i - 1] if i else seq.params.adapter
        hashes.append(hash((parent, tuple(tokens))))
    return hashes
