"""8-bit dense weights: the opt-in `--dense-dtype int8` mode.

A bf16 weight W [N, K] becomes `Q8Weight(q, scale)`: q [N, K] uint8 = round(W / d) + 128 and
scale [N, K/32] float32 = d = max|W_block| / 127 per 32-value block (llama.cpp's q8_0 with an
fp32 scale; the +128 makes q the unsigned operand of the CPU's int8 dot product). In each row,
every whole run of 16 blocks (512 values) is stored interleaved: byte 64 t + 4 l + i holds
value 4 t + i of block l, so that the native kernel's 16 accumulator lanes are the 16 blocks
(`interleave`); blocks after the last whole run keep the plain order. Decode reads
half the bytes of bf16; the cost is a rounding error of at most d/2 per weight, and the native
GEMV also rounds the activations to 8 bits per 32-block. The bf16 weights are dropped once
quantized: there is no second copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 32
_ROWS_PER_STEP = 1024  # rows quantized at a time: no full fp32 copy of a large W


def interleave(v: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """[N, K] -> same values in the stored byte order (or back, with `inverse`)."""
    n, k = v.shape
    whole = (k // (16 * BLOCK)) * 16 * BLOCK
    out = v.clone()
    runs = v[:, :whole].reshape(n, -1, 8, 16, 4) if inverse else \
        v[:, :whole].reshape(n, -1, 16, 8, 4)  # [N, runs, t, l, i] or [N, runs, l, t, i]
    out[:, :whole] = runs.transpose(2, 3).reshape(n, whole)
    return out


@dataclass(frozen=True)
class Q8Weight:
    q: torch.Tensor  # [N, K] uint8, value + 128
    scale: torch.Tensor  # [N, K/32] float32

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def device(self) -> torch.device:
        return self.q.device

    @classmethod
    def quantize(cls, w: torch.Tensor) -> Q8Weight:
        """w [N, K] (K % 32 == 0), any float dtype -> its 8-bit form (round half to even)."""
        if w.dim() != 2 or w.shape[1] % BLOCK:
            raise ValueError(f"8-bit weights need [N, K] with K % {BLOCK} == 0, got {tuple(w.shape)}")
        n, k = w.shape
        q = torch.empty(n, k, dtype=torch.uint8, device=w.device)
        scale = torch.empty(n, k // BLOCK, dtype=torch.float32, device=w.device)
        for r in range(0, n, _ROWS_PER_STEP):
            blk = w[r:r + _ROWS_PER_STEP].float().view(-1, k // BLOCK, BLOCK)
            d = blk.abs().amax(-1) / 127.0  # [rows, K/32]
            inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
            v = torch.round(blk * inv[..., None]).clamp_(-127, 127) + 128
            q[r:r + _ROWS_PER_STEP] = interleave(v.to(torch.uint8).view(-1, k))
            scale[r:r + _ROWS_PER_STEP] = d
        return cls(q, scale)

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """-> W' [N, K] in `dtype` (each value (q - 128) * d, rounded once to `dtype`)."""
        v = (interleave(self.q, inverse=True).to(torch.float32) - 128).view(*self.scale.shape, BLOCK)
        return (v * self.scale[..., None]).view(self.q.shape).to(dtype)
