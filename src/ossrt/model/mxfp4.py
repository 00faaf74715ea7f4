"""MXFP4 (OCP microscaling FP4): 32 E2M1 values share one E8M0 scale.

Packed layout, as in both gpt-oss checkpoint layouts: a weight [..., rows, K] is stored as
`blocks` uint8 [..., rows, K/32, 16] and `scales` uint8 [..., rows, K/32]. Within a block,
value 2k is the low nibble of byte k and value 2k+1 the high nibble; a nibble indexes
`E2M1_VALUES`; the block's values are multiplied by 2^(scale - 127).
Dequantization is exact in bfloat16 and float32 (a table value times a power of two).
"""

from __future__ import annotations

import torch

E2M1_VALUES: tuple[float, ...] = (
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
    -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
)
BLOCK = 32
BYTES_PER_BLOCK = BLOCK // 2
SCALE_BIAS = 127

_TABLES: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}


def byte_table(dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """[256, 2] table: byte b -> (E2M1[b & 15], E2M1[b >> 4])."""
    key = ("byte", dtype, torch.device(device))
    if key not in _TABLES:
        nib = torch.tensor(E2M1_VALUES, dtype=torch.float32)
        b = torch.arange(256)
        _TABLES[key] = torch.stack([nib[b & 15], nib[b >> 4]], dim=1).to(device=key[2], dtype=dtype)
    return _TABLES[key]


def scale_factors(scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """E8M0 bytes -> 2^(s - 127), exact in float32 and bfloat16 (byte 255 is NaN in OCP MX)."""
    f = torch.exp2(scales.to(torch.float32) - SCALE_BIAS)
    return torch.where(scales == 255, torch.full_like(f, float("nan")), f).to(dtype)


def _scaled_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[65536, 2] table: (scale << 8 | byte) -> both values of the byte, already scaled.

    Every product is exact (a table value times a power of two), so one lookup replaces the
    lookup-then-multiply and gives bit-identical results about 4x faster.
    """
    key = ("scaled", dtype, device)
    if key not in _TABLES:
        s = scale_factors(torch.arange(256, dtype=torch.uint8), torch.float32)  # [256]
        t = s[:, None, None] * byte_table(torch.float32)[None]  # [256 scales, 256 bytes, 2]
        _TABLES[key] = t.reshape(65536, 2).to(dtype=dtype, device=device)
    return _TABLES[key]


def dequantize(blocks: torch.Tensor, scales: torch.Tensor,
               dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """blocks [..., G, 16] uint8, scales [..., G] uint8 -> [..., G*32] of `dtype`."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError("MXFP4 blocks and scales must be uint8")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BYTES_PER_BLOCK:
        raise ValueError(f"MXFP4 shapes do not match: blocks {tuple(blocks.shape)}, "
                         f"scales {tuple(scales.shape)}")
    idx = (scales.to(torch.int32) << 8).unsqueeze(-1) | blocks  # [..., G, 16] int32
    vals = torch.nn.functional.embedding(idx, _scaled_table(dtype, blocks.device))  # [.., 16, 2]
    return vals.flatten(-3)  # [..., G*32]


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., K] (K % 32 == 0) -> (blocks [..., K/32, 16], scales [..., K/32]).

    Each block's scale is the smallest power of two that fits its largest magnitude within
    E2M1's range (6), and every value rounds to the nearest E2M1 value (ties toward zero).
    Exact values of the form E2M1 * 2^k round-trip unchanged.
    """
    if w.shape[-1] % BLOCK:
        raise ValueError(f"last dimension {w.shape[-1]} is not a multiple of {BLOCK}")
    x = w.to(torch.float32).reshape(*w.shape[:-1], w.shape[-1] // BLOCK, BLOCK)
    amax = x.abs().amax(dim=-1)  # [..., G]
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    exp = torch.ceil(torch.log2(safe / 6.0))
    exp = torch.where(amax > 0, exp, torch.full_like(exp, -SCALE_BIAS)).clamp(-127, 127)
    scaled = x / torch.exp2(exp).unsqueeze(-1)
    mags = torch.tensor(E2M1_VALUES[:8])
    code = (scaled.abs().unsqueeze(-1) - mags).abs().argmin(dim=-1)  # first (smaller) on ties
    code = code | ((scaled < 0) & (code > 0)).to(code.dtype) << 3
    code = code.to(torch.uint8).reshape(*x.shape[:-1], BYTES_PER_BLOCK, 2)
    blocks = code[..., 0] | (code[..., 1] << 4)
    scales = (exp + SCALE_BIAS).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()
