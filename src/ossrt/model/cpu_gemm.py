"""bf16 matrix products on CPUs without bf16 matrix instructions, and the scratch buffers that
the prefill paths dequantize into.

torch's CPU bf16 GEMM is fast only with AVX512-BF16 or AMX. Elsewhere (AVX2, AVX-512F alone) it
runs several times below its fp32 GEMM: measured on AMD Zen 1 (AVX2), [512, 2880] x
[2880, 5760], 10.8 GFLOPS in bf16 against 60.4 in fp32. Every product of two bf16 values is
exact in fp32 and both GEMMs sum in fp32, so on those CPUs the same product is computed in fp32
and rounded to bf16 once: the result differs from the bf16 GEMM's only in summation order.
`OSSRT_CPU_GEMM=bf16|f32` overrides the choice.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import kernels


def _rows_per_chunk(m: int) -> int:
    """Rows of W converted to fp32 per GEMM: the fp32 chunk (rows x K x 4 bytes, ~3-6 MiB at
    K = 2,880) stays in the cache between the conversion and the GEMM, and there is never an
    fp32 copy of a whole W. Measured on Zen 1 for W [5760, 2880] from MXFP4: M = 64, 46 ms in
    256-row chunks vs 82 ms whole; M = 256, 137 ms in 512-row chunks vs 220 ms whole."""
    return 256 if m < 128 else 512


@functools.cache
def bf16_via_f32() -> bool:
    """True where CPU bf16 GEMMs should run in fp32 (no AVX512-BF16 and no AMX)."""
    forced = os.environ.get("OSSRT_CPU_GEMM")
    if forced in ("bf16", "f32"):
        return forced == "f32"
    try:
        return not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # torch without the probes: keep its bf16 GEMM
        return False


def use_f32(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether x @ w^T (both bf16, CPU) takes the fp32 route: only with autograd off (inference),
    since the scratch buffers and chunked writes are not differentiable as one product."""
    return (x.dtype == w.dtype == torch.bfloat16 and x.device.type == "cpu"
            and not torch.is_grad_enabled() and bf16_via_f32())


_SCRATCH = threading.local()


def scratch(slot: int, n: int, shape: tuple[int, ...] | torch.Size,
            dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """This thread's scratch buffer (`slot`, `dtype`) viewed as `shape` (n elements); reused
    across calls (no fresh pages per expert or layer), valid until the next use of that slot."""
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None:
        bufs = _SCRATCH.bufs = {}
    buf = bufs.get((slot, dtype))
    if buf is None or buf.numel() < n:
        with torch.inference_mode(False):  # a normal tensor: writable in and out of that mode
            buf = bufs[(slot, dtype)] = torch.empty(n, dtype=dtype)
    return buf[:n].view(*shape)


def linear_f32(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [..., K] @ w [N, K]^T + b -> [..., N] in `out_dtype` (default x's), computed in fp32:
    x once, w in chunks of rows through a scratch buffer."""
    return _chunked(x, w.shape, lambda r0, r1, buf: buf.copy_(w[r0:r1]), b, out_dtype)


def mxfp4_linear_f32(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor,
                     b: torch.Tensor | None, out_dtype: torch.dtype | None = None
                     ) -> torch.Tensor:
    """x [..., K] @ W^T + b, W [N, K] given as MXFP4 blocks [N, K/32, 16] and scales
    [N, K/32]: `linear_f32` with W dequantized chunk by chunk (native kernel, exact in fp32)."""
    shape = (scales.shape[0], scales.shape[1] * 32)
    return _chunked(x, shape, lambda r0, r1, buf: kernels.dequant_f32(
        blocks[r0:r1], scales[r0:r1], buf), b, out_dtype)


def _chunked(x: torch.Tensor, w_shape: tuple[int, int] | torch.Size,
             fill: Callable[[int, int, torch.Tensor], object], b: torch.Tensor | None,
             out_dtype: torch.dtype | None) -> torch.Tensor:
    """y = x W^T + b in fp32, where fill(r0, r1, buf) writes W[r0:r1] into fp32 buf."""
    n, k = w_shape
    x32 = x.reshape(-1, k).float()
    out = torch.empty(x32.shape[0], n, dtype=out_dtype or x.dtype, device=x.device)
    step = _rows_per_chunk(x32.shape[0])
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        wc = scratch(3, (r1 - r0) * k, (r1 - r0, k), torch.float32)
        fill(r0, r1, wc)
        out[:, r0:r1] = F.linear(x32, wc, None if b is None else b[r0:r1].float())
    return out.view(*x.shape[:-1], n)
