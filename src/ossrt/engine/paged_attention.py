"""KV storage for the two block pools, and attention over it for mixed (varlen) batches.

Storage: each group ("full", "sliding") holds k and v as [layers in group, blocks * block_size,
Hkv, D]; position p of a sequence lives at slot table[p // bs] * bs + p % bs of its group.
`PagedAttention` is the model's `AttentionBackend` for one step: it writes the step's new keys
and values into their slots, then lets each sequence's queries attend over the keys they can
see (all earlier positions on full layers, the last W on sliding layers), with sinks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import kernels
from ..model import hugepages
from ..model.config import FULL, SLIDING, GptOssConfig
from ..model.layers import attend
from .kv_cache import BlockTable, KVCacheSpec

GROUPS = (FULL, SLIDING)


class PagedKVStorage:
    def __init__(self, cfg: GptOssConfig, spec: KVCacheSpec, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        self.cfg, self.spec = cfg, spec
        self.group_of: list[tuple[str, int]] = []  # layer -> (group, index within group)
        counts = {FULL: 0, SLIDING: 0}
        for kind in cfg.layer_types:
            self.group_of.append((kind, counts[kind]))
            counts[kind] += 1
        blocks = {FULL: spec.num_blocks_full, SLIDING: spec.num_blocks_sliding}
        self.k: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}
        for g in GROUPS:
            shape = (counts[g], blocks[g] * spec.block_size, cfg.num_key_value_heads,
                     cfg.head_dim)
            self.k[g], self.v[g] = _zeros(shape, dtype, device), _zeros(shape, dtype, device)

    @staticmethod
    def bytes_per_block(cfg: GptOssConfig, group: str, block_size: int,
                        dtype: torch.dtype) -> int:
        layers = sum(1 for t in cfg.layer_types if t == group)
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * layers * block_size * cfg.num_key_value_heads * cfg.head_dim * elem


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Zeros; on the CPU resident only as blocks are first written (and in huge pages)."""
    if torch.device(device).type == "cpu":
        return hugepages.empty(shape, dtype)
    return torch.zeros(shape, dtype=dtype, device=device)


def _native_cache(kc: torch.Tensor, vc: torch.Tensor) -> bool:
    """A layer's cache that the native attention kernels read in place: CPU, bf16, contiguous."""
    return (kc.device.type == "cpu" and kc.dtype == torch.bfloat16 and kc.is_contiguous()
            and vc.is_contiguous() and kernels.available())


@dataclass(frozen=True, slots=True)
class SeqSlice:
    """One sequence's part of a flat batch: rows [row, row + n) are positions [start, start+n)."""

    row: int
    n: int
    start: int
    k_lo: dict[str, int]  # first visible key position, per group
    read_slots: dict[str, torch.Tensor]  # [start + n - k_lo] slots of positions k_lo.., per group


def _slots(table: list[int] | list[int | None], lo: int, hi: int, bs: int) -> torch.Tensor:
    """Slots of positions [lo, hi) through a block table."""
    pos = torch.arange(lo, hi)
    ids = [table[b] for b in range(lo // bs, (hi - 1) // bs + 1)] if hi > lo else []
    if any(i is None for i in ids):
        raise RuntimeError(f"positions [{lo}, {hi}) reach a released block: KV manager bug")
    blocks = torch.tensor(ids, dtype=torch.long)
    return blocks[pos // bs - lo // bs] * bs + pos % bs


class PagedAttention:
    """The model's attention backend for one step over `PagedKVStorage`."""

    def __init__(self, storage: PagedKVStorage,
                 chunks: list[tuple[int, int, BlockTable]]) -> None:
        """chunks: (start, n, block table) per sequence, in the order of the flat batch."""
        self.storage = storage
        cfg, bs = storage.cfg, storage.spec.block_size
        w = cfg.sliding_window
        self.seqs: list[SeqSlice] = []
        writes: dict[str, list[torch.Tensor]] = {g: [] for g in GROUPS}
        row = 0
        for start, n, table in chunks:
            k_lo = {FULL: 0, SLIDING: max(0, start - w + 1)}
            read = {}
            for g, tab in ((FULL, table.full), (SLIDING, table.sliding)):
                if storage.k[g].shape[0] == 0:
                    continue
                read[g] = _slots(tab, k_lo[g], start + n, bs)
                writes[g].append(read[g][-n:])
            self.seqs.append(SeqSlice(row, n, start, k_lo, read))
            row += n
        self.write_slots = {g: torch.cat(writes[g]) for g in GROUPS if writes[g]}
        # the decode sequences (one new token each), batched into one attn_decode call per
        # layer: their rows, and per group their read slots end to end with offsets [decodes + 1]
        dec = [s for s in self.seqs if s.n == 1]
        self.dec_rows = torch.tensor([s.row for s in dec], dtype=torch.long)
        self.all_decode = len(dec) == row
        self.dec_read: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for g in self.write_slots:
            lens = torch.tensor([0] + [s.read_slots[g].numel() for s in dec], dtype=torch.long)
            reads = [s.read_slots[g] for s in dec]
            self.dec_read[g] = (torch.cat(reads) if reads else torch.empty(0, dtype=torch.long),
                                lens.cumsum(0))

    def native_decode(self, layer: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                 torch.Tensor] | None:
        """For a step of decode rows only, over a CPU bf16 cache: (kc, vc, write slots, read
        slots, offsets) of this layer, for `kernels.decode_layer` to write and read the cache
        itself exactly as `__call__` would; else None."""
        if not self.all_decode or not self.seqs:
            return None
        group, idx = self.storage.group_of[layer]
        kc, vc = self.storage.k[group][idx], self.storage.v[group][idx]  # [slots, Hkv, D]
        if not _native_cache(kc, vc):
            return None
        return (kc, vc, self.write_slots[group], *self.dec_read[group])

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 sinks: torch.Tensor) -> torch.Tensor:
        """q [N, Hq, D], k/v [N, Hkv, D] -> [N, Hq, D]."""
        group, idx = self.storage.group_of[layer]
        window = self.storage.cfg.window(layer)
        kc, vc = self.storage.k[group][idx], self.storage.v[group][idx]  # [slots, Hkv, D]
        slots = self.write_slots[group]
        if slots.device != kc.device:
            slots = slots.to(kc.device)
        kc.index_copy_(0, slots, k if k.dtype == kc.dtype else k.to(kc.dtype))
        vc.index_copy_(0, slots, v if v.dtype == vc.dtype else v.to(vc.dtype))
        scale = self.storage.cfg.head_dim ** -0.5
        native = q.dtype == kc.dtype and _native_cache(kc, vc)
        batched = native and self.dec_rows.numel() > 0
        if batched:  # every decode row's keys are all visible: read the cache in place
            read, offsets = self.dec_read[group]
            if self.all_decode:
                return kernels.attn_decode(q, kc, vc, read, sinks, scale, offsets)
        out = torch.empty_like(q)
        if batched:
            out[self.dec_rows] = kernels.attn_decode(q[self.dec_rows], kc, vc, read, sinks, scale,
                                                     offsets)
        for s in self.seqs:
            if s.n == 1 and batched:
                continue
            read = s.read_slots[group].to(kc.device)
            ks, vs = kc.index_select(0, read)[None], vc.index_select(0, read)[None]
            qs = q[None, s.row:s.row + s.n]  # [1, n, Hq, D]
            out[s.row:s.row + s.n] = attend(qs, ks, vs, sinks, s.start, s.k_lo[group],
                                            window, scale)[0]
        return out
