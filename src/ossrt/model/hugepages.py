"""Weights in transparent huge pages (CPU).

A checkpoint's tensors come back memory-mapped from the page cache, in 4 KiB pages. Decode
streams every active weight once per token, and over 4 KiB pages that stream runs at about
half the machine's bandwidth (a TLB miss every 4 KiB, and the hardware prefetcher stops at each
page boundary): measured on the 20b shape, a bf16 GEMV reads 30 GB/s from the mapping and
59 GB/s from 2 MiB pages. `to_hugepages` copies a tensor into anonymous memory advised
`MADV_HUGEPAGE` and drops the source's file pages from this process (`MADV_DONTNEED`, the page
cache keeps them), so that the copy never costs a second resident copy of the weights.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os

import torch

HUGE = 2 << 20  # bytes: the x86-64 huge page
MIN_BYTES = 1 << 20  # smaller tensors stay where they are
_PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def enabled() -> bool:
    """False where the kernel has no transparent huge pages or `OSSRT_NO_HUGEPAGES=1`."""
    if os.environ.get("OSSRT_NO_HUGEPAGES") == "1" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (free memory plus reclaimable caches); 0 if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def release(t: torch.Tensor) -> None:
    """Drops the whole pages inside contiguous `t`'s bytes from this process's resident set.
    Only for a file mapping that is never written (its pages come back from the file if touched
    again); on anonymous memory it would zero them."""
    start = t.data_ptr()
    first = -(-start // _PAGE) * _PAGE
    last = (start + t.numel() * t.element_size()) // _PAGE * _PAGE
    if last > first:
        _libc.madvise(first, last - first, mmap.MADV_DONTNEED)


def empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor in its own huge-page-advised anonymous mapping (freed with the tensor).
    The kernel hands out such memory zeroed and only as it is first touched, so this is also a
    `torch.zeros` that costs no resident memory until used (the paged KV cache's pool)."""
    nbytes = max(1, int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size())
    buf = mmap.mmap(-1, -(-nbytes // HUGE) * HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if enabled():
        buf.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes).view(dtype).view(shape)


def file_mappings() -> list[tuple[int, int]]:
    """[start, end) of this process's file-backed mappings (from /proc/self/maps)."""
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):
                    lo, hi = fields[0].split("-")
                    ranges.append((int(lo, 16), int(hi, 16)))
    except OSError:
        pass
    return ranges


def _in(t: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    lo = t.data_ptr()
    hi = lo + t.numel() * t.element_size()
    return any(a <= lo and hi <= b for a, b in ranges)


def to_hugepages(t: torch.Tensor, files: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """A contiguous copy of CPU tensor `t` in huge pages (or `t` itself if it is small, not on
    the CPU, or huge pages are off). If contiguous `t` lies in one of `files` (see
    `file_mappings`; a checkpoint mapping that is only ever read), its pages are released from
    this process once copied."""
    if t.device.type != "cpu" or t.numel() * t.element_size() < MIN_BYTES or not enabled():
        return t
    out = empty(t.shape, t.dtype)
    out.copy_(t)
    drop(t, files)
    return out


def drop(t: torch.Tensor, files: list[tuple[int, int]] | None) -> None:
    """Releases contiguous `t`'s pages if it lies in one of `files` (else does nothing)."""
    if files and t.device.type == "cpu" and t.is_contiguous() and _in(t, files):
        release(t)
