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
                           sources=[str(Path(__file__).with_name(f))
                                    for f in ("mxfp4_cpu.cpp", "decode_ops.cpp")],
                           extra_cflags=["-O3", "-march=native", "-fopenmp"],
                           extra_ldflags=["-fopenmp"], build_directory=str(build),
                           verbose=False)
    except Exception as exc:  # no compiler / ninja: the torch path still works
        log.warning("ossrt: native MXFP4 kernel unavailable (%s); using the torch path", exc)
        _MODULE = None
    return _MODULE


def available() -> bool:
    return _load() is not None


def isa() -> str:
    """The instruction set the kernels were built for: "avx512bf16", "avx2" (its MXFP4 dot
    products quantize x to int16 per 32-block: error at most 2^-16 of the block's largest |x|
    per value) or "portable"; "" when they are unavailable."""
    mod = _load()
    return mod.isa() if mod is not None else ""


def mxfp4_linear(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] -> [M, N] in x's dtype; blocks [N, K/32, 16], scales [N, K/32] uint8."""
    mod = _load()
    if x.dtype == torch.bfloat16:  # decoded to bf16, fp32 accumulation (the model's path)
        return mod.mxfp4_linear_bf16(x, blocks, scales, bias).to(x.dtype)
    y = mod.mxfp4_linear(x.float(), blocks, scales, None if bias is None else bias.float())
    return y.to(x.dtype)


def moe_token(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
              w1_blocks: torch.Tensor, w1_scales: torch.Tensor, w1_bias: torch.Tensor,
              w2_blocks: torch.Tensor, w2_scales: torch.Tensor, w2_bias: torch.Tensor,
              limit: float, alpha: float) -> torch.Tensor:
    """One token's MoE feed-forward in one native call: x [H] bf16, idx [K] expert ids,
    weights [K] -> [H] float32 = sum_j weights[j] * expert_{idx[j]}(x) (SwiGLU between the
    packed gate/up [E, 2I, H/32, 16] and down [E, H, I/32, 16] matrices)."""
    return _load().moe_token(x, idx, weights, w1_blocks, w1_scales, w1_bias,
                             w2_blocks, w2_scales, w2_bias, float(limit), float(alpha))


def moe_rows(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
             w1_blocks: torch.Tensor, w1_scales: torch.Tensor, w1_bias: torch.Tensor,
             w2_blocks: torch.Tensor, w2_scales: torch.Tensor, w2_bias: torch.Tensor,
             limit: float, alpha: float) -> torch.Tensor:
    """A few tokens' MoE feed-forward in one native call (batched decode): x [N, H] bf16,
    idx [N, K], weights [N, K] -> [N, H] float32. The (token, expert) pairs are grouped by
    expert inside, so each used expert's packed bytes are read once for all its tokens."""
    return _load().moe_rows(x, idx, weights, w1_blocks, w1_scales, w1_bias,
                            w2_blocks, w2_scales, w2_bias, float(limit), float(alpha))


def dequant_bf16(blocks: torch.Tensor, scales: torch.Tensor,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """blocks [..., G, 16], scales [..., G] uint8 -> [..., G*32] bf16, bit-identical to
    `mxfp4.dequantize(blocks, scales, torch.bfloat16)`, parallel and vectorized; written into
    `out` (contiguous bf16, same number of elements) when given, and returned."""
    return _load().dequant_bf16(blocks, scales, out)


def dequant_f32(blocks: torch.Tensor, scales: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """`dequant_bf16`'s contract in float32: bit-identical to
    `mxfp4.dequantize(blocks, scales, torch.float32)`."""
    return _load().dequant_f32(blocks, scales, out)


def q8_linear(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] bf16 @ W^T (+ bias) -> [M, N] float32 for an 8-bit W (`layers.Q8Weight`): wq
    [N, K] uint8 (value + 128), ws [N, K/32] float32; x is quantized to 8 bits per 32-block."""
    return _load().q8_linear(x, wq, ws, bias)


def q8_dequant_bf16(wq: torch.Tensor, ws: torch.Tensor,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """8-bit W -> [N, K] bf16 (into `out` when given), equal to `Q8Weight.dequantize`."""
    return _load().q8_dequant_bf16(wq, ws, out)


def bf16_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] bf16 @ w [N, K] bf16 (+ bias) -> [M, N] float32, accumulated in fp32."""
    return _load().bf16_linear(x, w, bias)


def attn_decode(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, slots: torch.Tensor,
                sinks: torch.Tensor, scale: float,
                offsets: torch.Tensor | None = None) -> torch.Tensor:
    """One query token over cached keys read in place by slot: q [Hq, D]; kc, vc [slots, Hkv, D]
    bf16; slots [S] (all visible) -> [Hq, D] bf16, softmax with each head's sink in the
    denominator, computed in fp32. Batched: q [B, Hq, D] and offsets [B + 1] (sequence b reads
    slots[offsets[b]:offsets[b + 1]]) -> [B, Hq, D], each row as its own call would give."""
    return _load().attn_decode(q, kc, vc, slots, sinks, float(scale), offsets)


def rms_norm_bf16(x: torch.Tensor, r: torch.Tensor | None, w: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, H] bf16 (+ r [N, H], rounded to bf16), w [H] bf16 -> (s = x + r, rms_norm(s)),
    both bf16: `layers.rms_norm` of the residual sum in one call."""
    s, y = _load().rms_norm_bf16(x, r, w, float(eps))
    return s, y


def rope_bf16_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """`YarnRope.apply` on contiguous bf16 q [N, Hq, D] and k [N, Hkv, D], in place, bit for bit;
    cos, sin [N, D/2] float32."""
    _load().rope_bf16_(q, k, cos, sin)


def bf16_linear_bf16(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`bf16_linear` rounded to bf16 in the same call."""
    return _load().bf16_linear_bf16(x, w, bias)


def moe_decode(x: torch.Tensor, h: torch.Tensor, router_w: torch.Tensor, router_b: torch.Tensor,
               top_k: int, w1_blocks: torch.Tensor, w1_scales: torch.Tensor,
               w1_bias: torch.Tensor, w2_blocks: torch.Tensor, w2_scales: torch.Tensor,
               w2_bias: torch.Tensor, limit: float, alpha: float) -> torch.Tensor:
    """The residual MoE step of a few tokens, router included: x [N, H] + `layers.moe`(h [N, H])
    in bf16, the same result as the torch-side routing (router through `bf16_linear`) followed
    by `moe_token` (N = 1) or `moe_rows`."""
    return _load().moe_decode(x, h, router_w, router_b, int(top_k), w1_blocks, w1_scales,
                              w1_bias, w2_blocks, w2_scales, w2_bias, float(limit), float(alpha))


def decode_layer(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, w: list[torch.Tensor],
                 kc: torch.Tensor, vc: torch.Tensor, write_slots: torch.Tensor,
                 read_slots: torch.Tensor, offsets: torch.Tensor, top_k: int, eps: float,
                 scale: float, limit: float, alpha: float) -> torch.Tensor:
    """One decoder layer of N decode rows x [N, H] over a paged cache (kc, vc written at
    write_slots), in one call: the same native ops `model.Block.forward` calls, in its order.
    w: the layer's 19 tensors (`model._FUSED`'s order), or 23 with 8-bit projections (their
    uint8 values in the weights' places, then the scales of q, k, v and o)."""
    return _load().decode_layer(x, cos, sin, w, kc, vc, write_slots, read_slots, offsets,
                                int(top_k), float(eps), float(scale), float(limit), float(alpha))


def read_xor(t: torch.Tensor) -> int:
    """XOR of contiguous CPU tensor `t`'s 64-bit words (as a signed int64), read in parallel over
    torch's threads: the read loop `membw.read_bandwidth` times."""
    return int(_load().read_xor(t))
