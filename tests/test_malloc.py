"""`fix_mmap_threshold`: after it, a large block still gets its own mapping even once a larger
one has been freed (glibc's default raises the threshold then and serves it from the heap)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ossrt.engine.malloc import _libc

PROBE = r"""
import ctypes, sys
import torch
from ossrt.engine.malloc import fix_mmap_threshold

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "fixed":
    assert fix_mmap_threshold()
big = torch.empty(24 << 20, dtype=torch.uint8)  # above every threshold: mmapped
del big  # glibc's default now raises its threshold to 24 MiB
before = libc.mallinfo2().hblkhd
t = torch.empty(1 << 20, dtype=torch.uint8)
print(libc.mallinfo2().hblkhd - before)
"""


def _mapped_growth(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(_libc() is None or not hasattr(_libc(), "mallinfo2"),
                    reason="glibc >= 2.33 only")
def test_fixed_threshold_keeps_large_blocks_mapped() -> None:
    assert _mapped_growth("default") < 1 << 20  # the 1 MiB block came from the heap
    assert _mapped_growth("fixed") >= 1 << 20  # its own mapping, returned on free
