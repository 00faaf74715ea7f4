"""Optional native kernels, compiled on first use with the machine's C++ compiler.

`mxfp4_linear(x, blocks, scales, bias)` computes `x @ W.T + bias` for an MXFP4-packed W
straight from its bytes (see `mxfp4_cpu.cpp`). If the kernel cannot be built (no compiler, no
ninja) or `OSSRT_NO_KERNELS=1`, `available()` is False and callers use the pure-torch path.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
_MODULE: Any = None
_TRIED = False


def _load() -> Any:
    global _MODULE, _TRIED
    if _TRIED:
        return _MODULE
    _TRIED = True
    if os.environ.get("OSSRT_NO_KERNELS") == "1":
        return None
    try:
        from torch.utils.cpp_extension import load

        from ...harmony.tokenizer import cache_root

        build = cache_root() / "kernels" / torch.__version__
        build.mkdir(parents=True, exist_ok=True)
        # torch's build lock is a plain file: a process killed mid-build leaves it behind and
        # every later process waits on it forever. An flock dies with its holder, so under
        # ours any torch lock left in the folder is stale and is removed.
        with open(build / "ossrt.flock", "w") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            (build / "lock").unlink(missing_ok=True)
            _MODULE = load(name="ossrt_mxfp4_cpu",
                           sources=[str(Path(__file__).with_name("mxfp4_cpu.cpp"))],
                           extra_cflags=["-O3", "-march=native"], build_directory=str(build),
                           verbose=False)
    except Exception as exc:  # no compiler / ninja: the torch path still works
        log.warning("ossrt: native MXFP4 kernel unavailable (%s); using the torch path", exc)
        _MODULE = None
    return _MODULE


def available() -> bool:
    return _load() is not None


def mxfp4_linear(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] -> [M, N] in x's dtype; blocks [N, K/32, 16], scales [N, K/32] uint8."""
    mod = _load()
    y = mod.mxfp4_linear(x.float(), blocks, scales, None if bias is None else bias.float())
    return y.to(x.dtype)


def bf16_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] bf16 @ w [N, K] bf16 (+ bias) -> [M, N] float32, accumulated in fp32."""
    return _load().bf16_linear(x, w, bias)
