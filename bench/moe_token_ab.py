"""Side by side: `moe_token` of the working tree's kernel against the same kernel at a git
revision, both built in this process and timed alternately on 20b-shape random experts (6
layers of 32 experts in huge pages, so every call streams its 4 experts from memory).

    .venv/bin/python bench/moe_token_ab.py [REV]   # REV defaults to HEAD~1
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

from ossrt.model import hugepages

KDIR = Path(__file__).resolve().parents[1] / "src/ossrt/model/kernels"
L, E, I, H, K = 6, 32, 2880, 2880, 4


def build(name: str, files: dict[str, str], tmp: Path) -> object:
    """Compiles the kernel sources `files` (file name -> text, headers included) as one module."""
    d = tmp / name
    d.mkdir()
    for fname, text in files.items():
        (d / fname).write_text(text)
    sources = [str(d / f) for f in files if f.endswith(".cpp")]
    return load(name=f"ab_{name}", sources=sources,
                extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"], build_directory=str(d), verbose=False)


def kernel_files(rev: str | None) -> dict[str, str]:
    """The kernel directory's .cpp and .h files at git revision `rev`, or in the tree if None."""
    if rev is None:
        return {f.name: f.read_text() for f in KDIR.iterdir() if f.suffix in (".cpp", ".h")}
    names = subprocess.run(["git", "ls-tree", "--name-only", rev, "."], capture_output=True,
                           text=True, check=True, cwd=KDIR).stdout.split()
    return {n: subprocess.run(["git", "show", f"{rev}:./{n}"], capture_output=True, text=True,
                              check=True, cwd=KDIR).stdout
            for n in names if n.endswith((".cpp", ".h"))}


def main() -> None:
    rev = sys.argv[1] if len(sys.argv) > 1 else "HEAD~1"
    tmp = Path(tempfile.mkdtemp())
    mods = {rev: build("old", kernel_files(rev), tmp), "tree": build("new", kernel_files(None), tmp)}
    g = torch.Generator().manual_seed(0)
    hp = hugepages.to_hugepages
    layers = [(hp(torch.randint(0, 256, (E, 2 * I, H // 32, 16), dtype=torch.uint8, generator=g)),
               hp(torch.randint(118, 130, (E, 2 * I, H // 32), dtype=torch.uint8, generator=g)),
               torch.randn(E, 2 * I, generator=g),
               hp(torch.randint(0, 256, (E, H, I // 32, 16), dtype=torch.uint8, generator=g)),
               hp(torch.randint(118, 130, (E, H, I // 32), dtype=torch.uint8, generator=g)),
               torch.randn(E, H, generator=g)) for _ in range(L)]
    x = torch.randn(H, generator=g).bfloat16()
    w = torch.softmax(torch.randn(K, generator=g), 0)
    picks = [torch.randperm(E, generator=g)[:K] for _ in range(64)]
    nbytes = K * (2 * I * H + H * I) // 32 * 17  # packed bytes + scales read per call

    def run(m: object, n: int = 150) -> float:
        for i in range(L):
            m.moe_token(x, picks[i], w, *layers[i], 7.0, 1.702)
        t = time.perf_counter()
        for i in range(n):
            m.moe_token(x, picks[i % 64], w, *layers[i % L], 7.0, 1.702)
        return (time.perf_counter() - t) / n

    for _ in range(3):
        print("  ".join(f"{k}: {(dt := run(m)) * 1e3:.3f} ms ({nbytes / dt / 1e9:.1f} GB/s)"
                        for k, m in mods.items()), flush=True)


if __name__ == "__main__":
    main()
