"""MXFP4 dequantization and quantization, checked against the format itself (SPEC.md 3).

Expected values are built here from the E2M1 table and the E8M0 rule as written in the spec
(in float64, where every product is exact), never from ossrt's own constants.
"""

from __future__ import annotations

import math

import pytest
import torch

from ossrt.model.mxfp4 import dequantize, quantize

# SPEC.md section 3: nibble -> E2M1 value.
SPEC_E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
             -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _e2m1_from_bits(nibble: int) -> float:
    """E2M1 decoded from its bits (sign, 2 exponent bits with bias 1, 1 mantissa bit)."""
    sign = -1.0 if nibble & 8 else 1.0
    exp, man = (nibble >> 1) & 3, nibble & 1
    mag = man * 0.5 if exp == 0 else (1 + man / 2) * 2.0 ** (exp - 1)
    return math.copysign(mag, sign)


def test_spec_table_is_the_e2m1_format():
    # The table the tests rely on agrees with the E2M1 bit layout (sign of -0 included).
    for n in range(16):
        assert math.copysign(1, SPEC_E2M1[n]) == math.copysign(1, _e2m1_from_bits(n))
        assert SPEC_E2M1[n] == _e2m1_from_bits(n)


def _all_bytes_all_scales() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """blocks [255, 16, 16]: every scale row s holds all 256 byte values (byte g*16+k in block g)."""
    blocks = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(16, 16)
    blocks = blocks.expand(255, 16, 16).contiguous()
    scales = torch.arange(255, dtype=torch.int32).to(torch.uint8)[:, None].expand(255, 16).contiguous()
    expected = torch.empty(255, 16 * 32, dtype=torch.float64)
    for s in range(255):
        f = 2.0 ** (s - 127)
        row = []
        for b in range(256):
            row += [SPEC_E2M1[b & 15] * f, SPEC_E2M1[b >> 4] * f]  # low nibble first
        expected[s] = torch.tensor(row, dtype=torch.float64)
    return blocks, scales, expected


@pytest.fixture(scope="module")
def exhaustive():
    return _all_bytes_all_scales()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_every_byte_every_scale_bit_exact(exhaustive, dtype):
    blocks, scales, expected64 = exhaustive
    out = dequantize(blocks, scales, dtype)
    assert out.dtype == dtype
    assert out.shape == (255, 512)
    # float64 -> dtype is exact where representable and overflows to +-inf otherwise, which is
    # what the exact product must round to.
    expected = expected64.to(dtype)
    got_bits, exp_bits = out.view(INT_VIEW[dtype]), expected.view(INT_VIEW[dtype])
    bad = (got_bits != exp_bits).nonzero()
    assert bad.numel() == 0, (
        f"{len(bad)} mismatches, first at scale {int(bad[0, 0])}, element {int(bad[0, 1])}: "
        f"got {out[tuple(bad[0])].item()!r}, expected {expected[tuple(bad[0])].item()!r}")


def test_dequantize_signed_zero_and_nibble_order():
    # byte 0x80: low nibble 0 (+0), high nibble 8 (-0); byte 0x71: low 1 (0.5), high 7 (6).
    blocks = torch.zeros(1, 16, dtype=torch.uint8)
    blocks[0, 0], blocks[0, 1] = 0x80, 0x71
    out = dequantize(blocks, torch.tensor([127], dtype=torch.uint8), torch.float32)
    assert out.shape == (32,)
    assert out[0].item() == 0.0 and math.copysign(1, out[0].item()) == 1.0
    assert out[1].item() == 0.0 and math.copysign(1, out[1].item()) == -1.0
    assert out[2].item() == 0.5 and out[3].item() == 6.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_byte_255_is_nan(dtype):
    blocks = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(16, 16)
    scales = torch.full((16,), 255, dtype=torch.uint8)
    out = dequantize(blocks, scales, dtype)
    assert torch.isnan(out).all()
    # Neighbouring blocks with finite scales are unaffected.
    scales[3] = 127
    out = dequantize(blocks, scales, dtype)
    assert not torch.isnan(out[3 * 32:4 * 32]).any()
    assert torch.isnan(out[:3 * 32]).all() and torch.isnan(out[4 * 32:]).all()


@pytest.mark.parametrize("lead", [(), (3,), (2, 5), (2, 3, 4)])
def test_dequantize_shapes(lead):
    g = 3
    gen = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (*lead, g, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(120, 135, (*lead, g), generator=gen, dtype=torch.uint8)
    out = dequantize(blocks, scales, torch.float32)
    assert out.shape == (*lead, g * 32)
    # Element-wise independent check of a few positions.
    flat_b, flat_s, flat_o = blocks.reshape(-1, g, 16), scales.reshape(-1, g), out.reshape(-1, g * 32)
    for r in range(flat_b.shape[0]):
        for j in (0, 1, 17, 30, 31, g * 32 - 1):
            gi, k, hi = j // 32, (j % 32) // 2, j % 2
            byte = int(flat_b[r, gi, k])
            nib = byte >> 4 if hi else byte & 15
            assert flat_o[r, j].item() == SPEC_E2M1[nib] * 2.0 ** (int(flat_s[r, gi]) - 127)


def test_dequantize_rejects_bad_inputs():
    with pytest.raises(TypeError):
        dequantize(torch.zeros(2, 16, dtype=torch.int8), torch.zeros(2, dtype=torch.uint8))
    with pytest.raises(ValueError):
        dequantize(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError):
        dequantize(torch.zeros(2, 8, dtype=torch.uint8), torch.zeros(2, dtype=torch.uint8))


def _representable(shape, gen, k_range=(-20, 20)) -> torch.Tensor:
    """Values E2M1 * 2^k with one k per 32-block (the only case MXFP4 holds exactly)."""
    *lead, K = shape
    codes = torch.randint(0, 16, (*lead, K // 32, 32), generator=gen)
    codes[..., 0] = 7  # each block holds a +-6 * 2^k, so 2^k is the scale quantize must pick
    codes[..., 1] = 15
    vals = torch.tensor(SPEC_E2M1, dtype=torch.float64)[codes]
    ks = torch.randint(k_range[0], k_range[1] + 1, (*lead, K // 32, 1), generator=gen)
    return (vals * torch.exp2(ks.double())).float().reshape(shape)


def test_quantize_round_trips_representable_values():
    gen = torch.Generator().manual_seed(7)
    w = _representable((4, 6, 96), gen)
    w[0, 0, 32:64] = 0  # an all-zero block too
    blocks, scales = quantize(w)
    assert blocks.dtype == torch.uint8 and scales.dtype == torch.uint8
    assert blocks.shape == (4, 6, 3, 16) and scales.shape == (4, 6, 3)
    for dtype in (torch.float32, torch.bfloat16):
        back = dequantize(blocks, scales, dtype)
        assert torch.equal(back.float(), w), dtype


def test_quantize_round_trips_every_value_at_every_block_exponent():
    # Each block: the 15 distinct E2M1 values (and 6 to pin the scale) times 2^k.
    base = torch.tensor(SPEC_E2M1 * 2, dtype=torch.float32)  # 32 values, max |v| = 6
    ks = [-127, -126, *range(-100, 101, 7), 124, 125]  # 6 * 2^126 would overflow float32
    w = torch.stack([base * 2.0 ** k for k in ks])  # [len(ks), 32]
    blocks, scales = quantize(w)
    back = dequantize(blocks, scales, torch.float32)
    assert torch.equal(back, w)  # by value: quantize turns -0.0 into +0.0 (same number)
    # The scale byte is exactly 127 + k.
    assert scales.flatten().tolist() == [127 + k for k in ks]
    assert torch.equal(dequantize(blocks, scales, torch.bfloat16).float(), w)


def test_quantize_random_data_error_is_bounded():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=gen) * torch.exp2(torch.randint(-8, 8, (64, 1), generator=gen).float())
    blocks, scales = quantize(w)
    back = dequantize(blocks, scales, torch.float32)
    blockmax = w.reshape(64, 8, 32).abs().amax(-1, keepdim=True)
    err = (back - w).reshape(64, 8, 32).abs()
    # Scale 2^e is the smallest with blockmax <= 6 * 2^e; E2M1 spacing is at most 2 * 2^e, so
    # rounding to nearest is off by at most 2^e <= blockmax / 3.
    assert (err <= blockmax / 3 + 1e-30).all()
    # And on average much better than that (relative RMS error of 4-bit floats ~ 10-20%).
    rel = (back - w).norm() / w.norm()
    assert rel < 0.2, rel
    # Nothing overflows the 6 * scale range and signs are preserved.
    assert ((back == 0) | (torch.sign(back) == torch.sign(w))).all()


def test_quantize_rejects_bad_width():
    with pytest.raises(ValueError):
        quantize(torch.zeros(3, 33))


def _transformers_convert():
    mx = pytest.importorskip("transformers.integrations.mxfp4")
    fn = getattr(mx, "convert_moe_packed_tensors", None) or getattr(mx, "_convert_moe_packed_tensors", None)
    if fn is None:
        pytest.skip("transformers has no MXFP4 converter")
    return fn


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequantize_matches_transformers(dtype):
    convert = _transformers_convert()
    gen = torch.Generator().manual_seed(11)
    # Expert-shaped: [E, rows, G, 16]; transformers returns [E, G*32, rows] (dims 1, 2 swapped).
    blocks = torch.randint(0, 256, (3, 10, 4, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(100, 150, (3, 10, 4), generator=gen, dtype=torch.uint8)
    ref = convert(blocks.clone(), scales.clone(), dtype=dtype)
    assert ref.shape == (3, 4 * 32, 10)
    ours = dequantize(blocks, scales, dtype)
    assert ours.shape == (3, 10, 4 * 32)
    assert torch.equal(ours.transpose(1, 2).contiguous().view(INT_VIEW[dtype]),
                       ref.view(INT_VIEW[dtype]))


def test_dequantize_matches_transformers_all_bytes_all_scales(exhaustive):
    convert = _transformers_convert()
    blocks, scales, _ = exhaustive
    # Add a leading expert dim of 1 for transformers' [E, rows, G, 16] convention.
    ref = convert(blocks[None].clone(), scales[None].clone(), dtype=torch.float32)[0].T
    ours = dequantize(blocks, scales, torch.float32)
    finite = torch.isfinite(ref)
    assert torch.equal(ours[finite], ref[finite])
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
