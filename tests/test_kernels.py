"""The native MXFP4 kernel against dequantize-then-matmul, and the fallback switch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ossrt.model import kernels
from ossrt.model.mxfp4 import dequantize

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C++ toolchain here")


@pytest.mark.parametrize("m,n,k", [(1, 96, 64), (3, 40, 96), (8, 33, 32), (11, 128, 320)])
def test_mxfp4_linear_matches_dequantized_matmul(m: int, n: int, k: int) -> None:
    g = torch.Generator().manual_seed(m * 100 + n)
    blocks = torch.randint(0, 256, (n, k // 32, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(110, 135, (n, k // 32), dtype=torch.uint8, generator=g)
    x = torch.randn(m, k, generator=g)
    bias = torch.randn(n, generator=g)
    ref = torch.nn.functional.linear(x.double(), dequantize(blocks, scales, torch.float32).double(),
                                     bias.double())
    got = kernels.mxfp4_linear(x, blocks, scales, bias)
    assert got.shape == (m, n) and got.dtype == torch.float32
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-4 * ref.abs().max().item())
    no_bias = kernels.mxfp4_linear(x, blocks, scales, None)
    assert torch.allclose(no_bias + bias, got, atol=1e-5)


def test_kernel_keeps_input_dtype_and_exact_scale_edges() -> None:
    blocks = torch.full((2, 1, 16), 0x71, dtype=torch.uint8)  # low nibble 1 (0.5), high 7 (6)
    scales = torch.tensor([[127], [0]], dtype=torch.uint8)  # 2^0 and 2^-127
    x = torch.ones(1, 32, dtype=torch.bfloat16)
    y = kernels.mxfp4_linear(x, blocks, scales, None)
    assert y.dtype == torch.bfloat16
    assert y[0, 0].item() == 16 * (0.5 + 6.0)
    assert y[0, 1].float().item() == 16 * 6.5 * 2.0 ** -127


def test_fallback_when_kernels_are_switched_off() -> None:
    code = ("import os; os.environ['OSSRT_NO_KERNELS'] = '1'\n"
            "from ossrt.model import kernels; assert not kernels.available()")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("m,n,k", [(1, 50, 64), (2, 33, 96), (5, 17, 32), (1, 9, 40), (3, 8, 160),
                                   (4, 33, 2880), (8, 6, 64), (9, 7, 96), (17, 5, 32),
                                   # tiles of 4 weight rows with 1-3 left over, groups of 1-4 x rows
                                   (6, 19, 96), (7, 14, 64), (3, 13, 2880), (8, 41, 160), (5, 3, 64)])
def test_bf16_linear_matches_float64(m: int, n: int, k: int) -> None:
    g = torch.Generator().manual_seed(m * 7 + n)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16()
    ref = torch.nn.functional.linear(x.double(), w.double(), b.double())
    got = kernels.bf16_linear(x, w, b)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert torch.allclose(got.double(), ref, atol=1e-4, rtol=1e-5)  # fp32 accumulation


@pytest.mark.parametrize("m,n,k", [(1, 50, 64), (2, 33, 96), (1, 9, 40), (3, 13, 2880),
                                   (8, 41, 160), (5, 3, 64)])
def test_bf16_linear_bf16_is_the_fp32_result_rounded(m: int, n: int, k: int) -> None:
    """The bf16-output variant rounds as it writes: exactly `.to(bfloat16)` of the fp32 one."""
    g = torch.Generator().manual_seed(m * 11 + n)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    for b in (torch.randn(n, generator=g).bfloat16(), None):
        got = kernels.bf16_linear_bf16(x, w, b)
        assert got.dtype == torch.bfloat16 and got.shape == (m, n)
        assert torch.equal(got, kernels.bf16_linear(x, w, b).to(torch.bfloat16))


def test_model_linear_routes_single_rows_to_the_kernel_with_same_result() -> None:
    from ossrt.model.layers import linear

    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 96, generator=g).bfloat16()
    x = torch.randn(40, 96, generator=g).bfloat16()
    batched = linear(x, w)  # a GEMM (more rows than _GEMV_MAX_ROWS and _GEMV_MAX_ROWS_F32)
    rows = torch.cat([linear(x[i:i + 1], w) for i in range(40)])  # kernel path
    assert (batched.float() - rows.float()).abs().max() <= 0.02 * batched.float().abs().max()


def test_a_build_lock_left_by_a_killed_process_does_not_hang_the_next(tmp_path) -> None:
    """torch's cpp_extension lock is a plain file that outlives a killed builder; loading must
    not wait on it forever (it used to: every later process hung at the first forward)."""
    import shutil

    from ossrt.harmony.tokenizer import cache_root

    built = cache_root() / "kernels" / torch.__version__
    shutil.copytree(built, tmp_path / "kernels" / torch.__version__)
    (tmp_path / "kernels" / torch.__version__ / "lock").touch()  # the stale lock
    code = "from ossrt.model import kernels; print(kernels.available())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env={**__import__("os").environ,
                                           "OSSRT_CACHE": str(tmp_path)})
    assert out.stdout.strip() == "True", out.stderr


# ---- decode fast paths against the plain torch path (random inputs, odd shapes and tails) ----

def _x_quant_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[M, N] bound on |kernel - exact| that x's quantization adds on the AVX2 build (int16 per
    32-block: each value within 2^-16 of its block's largest |x|); 0 elsewhere."""
    if kernels.isa() != "avx2":
        return torch.zeros(x.shape[0], w.shape[0], dtype=torch.float64)
    amax = x.double().abs().view(x.shape[0], -1, 32).amax(-1).repeat_interleave(32, -1)
    return (amax / 65534) @ w.double().abs().T


@pytest.mark.parametrize("m,n,k", [(1, 96, 64), (1, 33, 160), (2, 17, 96), (3, 40, 32),
                                   (1, 7, 224), (1, 9, 544), (2, 5, 2880)])
def test_mxfp4_linear_bf16_matches_dequantized_matmul(m: int, n: int, k: int) -> None:
    """bf16 activations: blocks decoded to bf16, fp32 accumulation, scale applied in fp32
    (k/32 = 2, 5, 3, 1, 7, 17, 90 blocks: the unrolled 4- or 8-block loops and their tails)."""
    g = torch.Generator().manual_seed(m * 31 + n + k)
    blocks = torch.randint(0, 256, (n, k // 32, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(100, 140, (n, k // 32), dtype=torch.uint8, generator=g)
    x = torch.randn(m, k, generator=g).bfloat16()
    bias = torch.randn(n, generator=g).bfloat16()
    ref = torch.nn.functional.linear(x.double(), dequantize(blocks, scales, torch.float32)
                                     .double(), bias.double())
    got = kernels._load().mxfp4_linear_bf16(x, blocks, scales, bias)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    bound = _x_quant_bound(x, dequantize(blocks, scales, torch.float32))
    assert ((got.double() - ref).abs() <= 1e-5 * ref.abs() + 1e-5 * ref.abs().max() + bound).all()
    assert kernels.mxfp4_linear(x, blocks, scales, bias).dtype == torch.bfloat16


def _moe_inputs(e: int, h: int, i: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    def packed(rows: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randint(0, 256, (e, rows, k // 32, 16), dtype=torch.uint8, generator=g),
                torch.randint(118, 124, (e, rows, k // 32), dtype=torch.uint8, generator=g))
    w1b, w1s = packed(2 * i, h)
    w2b, w2s = packed(h, i)
    return {"router_w": torch.randn(e, h, generator=g).bfloat16(),
            "router_b": torch.randn(e, generator=g).bfloat16(),
            "w1_blocks": w1b, "w1_scales": w1s,
            "w1_bias": torch.randn(e, 2 * i, generator=g).bfloat16(),
            "w2_blocks": w2b, "w2_scales": w2s,
            "w2_bias": torch.randn(e, h, generator=g).bfloat16(),
            "x": torch.randn(1, h, generator=g).bfloat16()}


@pytest.mark.parametrize("e,h,i,k,scale", [(8, 96, 64, 4, 1.0), (5, 160, 96, 2, 1.0),
                                             (4, 32, 32, 4, 1.0), (6, 288, 160, 4, 1.0),
                                             (6, 288, 160, 4, 40.0)])
def test_moe_single_token_native_matches_torch_path(monkeypatch, e, h, i, k, scale) -> None:
    """One token's MoE in one native call against the per-expert torch path (dequantize,
    F.linear, SwiGLU, weighted sum), both in bf16. I = 160: the SwiGLU's 16-wide steps and its
    scalar tail; x scaled by 40: gate and linear values far past the clamp limit (7)."""
    from ossrt.model import layers

    w = _moe_inputs(e, h, i, seed=e * 100 + h + k)
    args = (w["x"] * scale, w["router_w"], w["router_b"], k, w["w1_blocks"], w["w1_scales"],
            w["w1_bias"], w["w2_blocks"], w["w2_scales"], w["w2_bias"], 7.0, 1.702)
    got = layers.moe(*args)
    monkeypatch.setattr(layers, "_KERNEL_MAX_ROWS", 0)  # per-expert torch dequantize path
    monkeypatch.setattr(kernels, "available", lambda: False)
    ref = layers.moe(*args)
    assert got.shape == ref.shape == (1, h) and got.dtype == torch.bfloat16
    err = (got.float() - ref.float()).abs().max().item()
    assert err <= 0.02 * ref.float().abs().max().item(), err


def test_moe_single_token_keeps_router_adjust(monkeypatch) -> None:
    """router_adjust (LoRA on the router) still steers which experts the native path uses."""
    from ossrt.model import layers

    w = _moe_inputs(6, 64, 32, seed=5)
    def run(adjust):
        return layers.moe(w["x"], w["router_w"], w["router_b"], 2, w["w1_blocks"],
                          w["w1_scales"], w["w1_bias"], w["w2_blocks"], w["w2_scales"],
                          w["w2_bias"], 7.0, 1.702, adjust)
    def force(inp, logits):  # experts 4 and 5 win whatever the router says
        logits[:, 4:] += 1000.0
    got, plain = run(force), run(None)
    monkeypatch.setattr(kernels, "available", lambda: False)
    ref = run(force)
    assert not torch.equal(got, plain)
    assert (got.float() - ref.float()).abs().max() <= 0.02 * ref.float().abs().max()


@pytest.mark.parametrize("hq,hkv,d,s,qscale", [
    (8, 2, 64, 37, 1.0), (4, 4, 16, 1, 1.0), (6, 3, 24, 130, 1.0),
    # head size 64 (the gpt-oss path): 1 key, key chunks with tails, G = 8, peaked softmax
    (8, 8, 64, 1, 1.0), (16, 2, 64, 300, 1.0), (64, 8, 64, 129, 1.0), (8, 1, 64, 257, 30.0)])
def test_attn_decode_matches_reference(hq, hkv, d, s, qscale) -> None:
    """Decode attention read in place by slot against attend_reference on gathered keys
    (slots scattered and unordered, as a block table makes them; D not a multiple of 16)."""
    from ossrt.model.layers import attend_reference

    g = torch.Generator().manual_seed(hq * d + s)
    nslots = s + 50
    kc = torch.randn(nslots, hkv, d, generator=g).bfloat16()
    vc = torch.randn(nslots, hkv, d, generator=g).bfloat16()
    slots = torch.randperm(nslots, generator=g)[:s]
    q = (torch.randn(hq, d, generator=g) * qscale).bfloat16()
    sinks = torch.randn(hq, generator=g).bfloat16()
    scale = d ** -0.5
    got = kernels.attn_decode(q, kc, vc, slots, sinks, scale)
    ref = attend_reference(q[None, None].double(), kc[slots][None].double(),
                           vc[slots][None].double(), sinks.double(), s - 1, 0, None, scale)[0, 0]
    assert got.dtype == torch.bfloat16 and got.shape == (hq, d)
    assert torch.allclose(got.double(), ref, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("d,lens", [(64, (37, 1, 300, 129)), (24, (5, 130, 1))])
def test_attn_decode_batched_equals_one_call_per_sequence(d: int, lens: tuple[int, ...]) -> None:
    """q [B, Hq, D] with offsets: each sequence's row is exactly what its own call gives, its
    keys read from its own slice of the slots (sequences of different lengths, shared cache)."""
    g = torch.Generator().manual_seed(d + len(lens))
    hq, hkv, nslots = 16, 2, 700
    kc = torch.randn(nslots, hkv, d, generator=g).bfloat16()
    vc = torch.randn(nslots, hkv, d, generator=g).bfloat16()
    q = torch.randn(len(lens), hq, d, generator=g).bfloat16()
    sinks = torch.randn(hq, generator=g).bfloat16()
    reads = [torch.randperm(nslots, generator=g)[:n] for n in lens]
    offsets = torch.tensor([0, *lens]).cumsum(0)
    got = kernels.attn_decode(q, kc, vc, torch.cat(reads), sinks, d ** -0.5, offsets)
    assert got.shape == q.shape
    for b, read in enumerate(reads):
        assert torch.equal(got[b], kernels.attn_decode(q[b], kc, vc, read, sinks, d ** -0.5))
    with pytest.raises(RuntimeError, match="offsets"):
        kernels.attn_decode(q, kc, vc, torch.cat(reads), sinks, d ** -0.5, offsets[:-1])
    with pytest.raises(RuntimeError, match="offsets"):
        kernels.attn_decode(q, kc, vc, torch.cat(reads), sinks, d ** -0.5, offsets - 1)


def test_attn_decode_probabilities_to_one_bf16_ulp() -> None:
    """With V = identity rows, the output is the softmax itself: every probability within one
    bf16 step of the float64 value (catches a loose exp, not just a wrong sum)."""
    from ossrt.model.layers import attend_reference

    g = torch.Generator().manual_seed(11)
    s, d, hq = 60, 64, 8
    kc = (torch.randn(s, 1, d, generator=g) * 3).bfloat16()
    vc = torch.eye(s, d).view(s, 1, d).bfloat16()
    q = torch.randn(hq, d, generator=g).bfloat16()
    sinks = torch.randn(hq, generator=g).bfloat16()
    slots = torch.arange(s)
    got = kernels.attn_decode(q, kc, vc, slots, sinks, d ** -0.5).double()
    ref = attend_reference(q[None, None].double(), kc[None].double(), vc[None].double(),
                           sinks.double(), s - 1, 0, None, d ** -0.5)[0, 0]
    assert ref[:, :s].sum(-1).lt(1).all() and ref.max() > 0.1  # a spread, peaked softmax
    assert ((got - ref).abs() <= ref.abs() * 2.0 ** -8 + 1e-30).all()


@pytest.mark.parametrize("where", [3, 40, 89])
def test_mxfp4_row_scale_maximum_anywhere_in_the_row(where: int) -> None:
    """K = 2,880 (90 blocks): the row's largest scale byte sits in the first 32 blocks, the
    second, or the last 26 (read by an overlapping load); each must be found (a maximum
    missed by 2^140 would overflow the blocks' fp32 factors), and so must a NaN scale (255)."""
    g = torch.Generator().manual_seed(where)
    blocks = torch.randint(0, 256, (4, 90, 16), dtype=torch.uint8, generator=g)
    scales = torch.full((4, 90), 100, dtype=torch.uint8)
    scales[:, where] = 240
    scales[3, where] = 255  # a NaN block, in the same place
    x = torch.randn(1, 2880, generator=g).bfloat16()
    got = kernels._load().mxfp4_linear_bf16(x, blocks, scales, None).double()
    assert torch.isnan(got[0, 3])
    got, w = got[:, :3], dequantize(blocks[:3], scales[:3], torch.float32)
    ref = torch.nn.functional.linear(x.double(), w.double())
    bound = _x_quant_bound(x, w)
    assert ((got - ref).abs() <= 1e-5 * ref.abs() + 1e-5 * ref.abs().max() + bound).all()


def test_mxfp4_linear_bf16_four_block_steps_and_scale_edges() -> None:
    """K = 256: two whole 4-block steps, no tail; scale bytes 0 (2^-127) and 255 (NaN) go
    through the per-lane scale vector like any other."""
    g = torch.Generator().manual_seed(11)
    blocks = torch.randint(0, 256, (5, 8, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(120, 134, (5, 8), dtype=torch.uint8, generator=g)
    scales[1] = 0
    scales[2, 5] = 255
    x = torch.randn(1, 256, generator=g).bfloat16()
    ref = torch.nn.functional.linear(x.double(), dequantize(blocks, scales, torch.float32)
                                     .double())
    got = kernels._load().mxfp4_linear_bf16(x, blocks, scales, None).double()
    assert torch.isnan(got[0, 2]) and torch.isnan(ref[0, 2])
    keep = [0, 1, 3, 4]
    w = dequantize(blocks, scales, torch.float32)
    bound = _x_quant_bound(x, w[keep])
    err = (got[:, keep] - ref[:, keep]).abs()
    assert (err <= 1e-5 * ref[:, keep].abs() + 1e-5 * ref[:, keep].abs().max() + bound).all()
    # row 1, all scales 2^-127: the result ~1e-37 keeps full fp32 precision (no denormal steps)
    assert got[0, 1] != 0 and (got[:, 1] - ref[:, 1]).abs() <= 1e-5 * ref[:, 1].abs() + bound[:, 1]


@pytest.mark.parametrize("n,e,h,i,k", [(2, 5, 96, 64, 2), (3, 7, 64, 32, 4), (8, 5, 160, 96, 3),
                                       (17, 9, 64, 64, 4)])
def test_moe_rows_native_matches_torch_path(monkeypatch, n, e, h, i, k) -> None:
    """A few tokens' MoE in one native call (pairs grouped by expert in C++) against the
    per-expert torch dequantize path; with few experts many tokens share an expert, and the
    router_adjust hook still steers the routing (here: expert 0 for every token)."""
    from ossrt.model import layers

    w = _moe_inputs(e, h, i, seed=n * 1000 + e * 10 + k)
    x = torch.randn(n, h, generator=torch.Generator().manual_seed(n)).bfloat16()
    calls = []
    real = kernels.moe_rows
    monkeypatch.setattr(kernels, "moe_rows", lambda *a: calls.append(1) or real(*a))
    def force(inp, logits):  # every token also uses expert 0: shared by all N rows
        logits[:, 0] += 1000.0
    def run(adjust):
        return layers.moe(x, w["router_w"], w["router_b"], k, w["w1_blocks"], w["w1_scales"],
                          w["w1_bias"], w["w2_blocks"], w["w2_scales"], w["w2_bias"], 7.0,
                          1.702, adjust)
    got, got_forced = run(None), run(force)
    assert len(calls) == 2
    monkeypatch.setattr(layers, "_KERNEL_MAX_ROWS", 0)  # per-expert torch dequantize path
    monkeypatch.setattr(kernels, "available", lambda: False)
    for a, adjust in ((got, None), (got_forced, force)):
        ref = run(adjust)
        assert a.shape == ref.shape == (n, h) and a.dtype == torch.bfloat16
        err = (a.float() - ref.float()).abs().max().item()
        assert err <= 0.02 * ref.float().abs().max().item(), err
    assert not torch.equal(got, got_forced)


@pytest.mark.parametrize("n,e,k", [(4, 16, 4), (9, 6, 3), (12, 3, 2)])
def test_moe_rows_matches_moe_token_per_row(n, e, k) -> None:
    """The batched MoE against the one-token MoE, token by token: experts with 1 to 8 pairs
    (the tile shapes of `row_dot_tiles`: 8 rows x 1 input, 4 x 2, 2 x up to 4 and leftovers),
    rows long enough for several 4-block steps plus a tail (H = 288: 9 blocks, I = 160: 5).
    Per (row, input) the arithmetic is the same, so only the order in which each token's K
    expert outputs are summed differs."""
    w = _moe_inputs(e, 288, 160, seed=n * 31 + e)
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 288, generator=g).bfloat16()
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])
    wt = torch.softmax(torch.randn(n, k, generator=g), 1)
    ws = [w[key] for key in ("w1_blocks", "w1_scales", "w1_bias", "w2_blocks", "w2_scales",
                             "w2_bias")]
    got = kernels.moe_rows(x, idx, wt, *ws, 7.0, 1.702)
    assert got.shape == (n, 288) and got.dtype == torch.float32
    for t in range(n):
        ref = kernels.moe_token(x[t], idx[t], wt[t], *ws, 7.0, 1.702)
        assert torch.allclose(got[t], ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item()), t


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (2, 5, 90)])
def test_dequant_is_bit_identical_to_dequantize(shape, dtype) -> None:
    g = torch.Generator().manual_seed(len(shape))
    blocks = torch.randint(0, 256, (*shape, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    scales.view(-1)[:4] = torch.tensor([0, 1, 254, 255], dtype=torch.uint8)[:scales.numel()]
    fn = kernels.dequant_bf16 if dtype == torch.bfloat16 else kernels.dequant_f32
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    ref = dequantize(blocks, scales, dtype)
    got = fn(blocks, scales)
    assert got.shape == ref.shape and got.dtype == dtype
    nan = ref.isnan()
    assert torch.equal(got.isnan(), nan)  # scale byte 255 is NaN (OCP MX)
    assert torch.equal(got.view(bits)[~nan], ref.view(bits)[~nan])  # -0.0 and denormals too
    out = torch.full((scales.numel() * 32,), 7.0, dtype=dtype)
    again = fn(blocks, scales, out)
    assert again.data_ptr() == out.data_ptr()
    assert torch.equal(out.view(bits)[~nan.view(-1)], ref.view(bits)[~nan])
    with pytest.raises(RuntimeError, match="out must be"):
        fn(blocks, scales, out[:-1])
    with pytest.raises(RuntimeError, match="out must be"):
        fn(blocks, scales, out.to(torch.float16))


def prefill_moe_args(monkeypatch) -> tuple:
    """`layers.moe` arguments for 80 tokens over 6 experts, with every expert forced onto the
    per-expert GEMM path (no native single-token or batched-decode call, no direct reads)."""
    from ossrt.model import layers
    inp = _moe_inputs(6, 64, 96, seed=9)
    x = torch.randn(80, 64, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    for name in ("_MOE_ROWS_MAX", "_KERNEL_MAX_ROWS", "_KERNEL_MAX_ROWS_F32"):
        monkeypatch.setattr(layers, name, 0)
    return (x, inp["router_w"], inp["router_b"], 2, inp["w1_blocks"], inp["w1_scales"],
            inp["w1_bias"], inp["w2_blocks"], inp["w2_scales"], inp["w2_bias"], 7.0, 1.702)


def test_moe_prefill_dequant_path_matches_torch_dequantize(monkeypatch) -> None:
    """Many tokens per expert (prefill): the native dequantization into the scratch buffers
    gives the same bits as the torch path, across several experts reusing the buffers."""
    from ossrt.model import cpu_gemm, layers
    args = prefill_moe_args(monkeypatch)
    monkeypatch.setattr(cpu_gemm, "bf16_via_f32", lambda: False)  # torch's bf16 GEMM
    native = layers.moe(*args)
    monkeypatch.setattr(layers.kernels, "available", lambda: False)
    torch_path = layers.moe(*args)
    assert torch.equal(native, torch_path)


# ---- fused decode ops against the torch expressions they replace ----

def test_rope_native_is_bit_identical_to_torch() -> None:
    from ossrt.model.config import preset
    from ossrt.model.layers import YarnRope

    rope = YarnRope(preset("20b"))
    g = torch.Generator().manual_seed(3)
    d = rope.inv_freq.numel() * 2
    q = (torch.randn(5, 4, d, generator=g) * 3).bfloat16()
    k = (torch.randn(5, 2, d, generator=g) * 3).bfloat16()
    cos, sin = rope.cos_sin(torch.tensor([0, 1, 77, 4000, 131000]))
    ref_q, ref_k = YarnRope.apply(q, cos, sin), YarnRope.apply(k, cos, sin)
    got_q, got_k = YarnRope.apply_qk(q.clone(), k.clone(), cos, sin)
    assert torch.equal(got_q.view(torch.int16), ref_q.view(torch.int16))
    assert torch.equal(got_k.view(torch.int16), ref_k.view(torch.int16))


@pytest.mark.parametrize("n,h", [(1, 2880), (3, 96), (2, 37)])
def test_add_rms_norm_native_matches_torch(n: int, h: int) -> None:
    from ossrt.model import layers

    g = torch.Generator().manual_seed(n + h)
    x = (torch.randn(n, h, generator=g) * 4).bfloat16()
    r = torch.randn(n, h, generator=g).bfloat16()
    w = torch.randn(h, generator=g).bfloat16()
    s, y = layers.add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(s, x + r)
    ref = layers.rms_norm_reference(x + r, w, 1e-5)
    # the sum of squares is taken in another order: at most one bf16 step apart
    assert ((y.float() - ref.float()).abs() <= ref.float().abs() * 2.0 ** -7 + 1e-30).all()
    assert torch.equal(layers.rms_norm(x, w, 1e-5), layers.add_rms_norm(x, torch.zeros_like(x),
                                                                        w, 1e-5)[1])


@pytest.mark.parametrize("n", [1, 3, 8])
def test_moe_add_fused_router_matches_torch_routing(monkeypatch, n: int) -> None:
    """x + moe(h) with the router inside the native call equals the torch-side routing
    followed by the same native expert kernel (moe_token for one token, moe_rows for more),
    bit for bit, and is what moe_add runs for decode rows."""
    from ossrt.model import kernels, layers

    w = _moe_inputs(8, 96, 64, seed=5 + n)
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 96, generator=g).bfloat16()
    hs = torch.randn(n, 96, generator=g).bfloat16()
    args = (w["router_w"], w["router_b"], 4, w["w1_blocks"], w["w1_scales"], w["w1_bias"],
            w["w2_blocks"], w["w2_scales"], w["w2_bias"], 7.0, 1.702)
    calls = []
    fused_op = kernels.moe_decode
    monkeypatch.setattr(kernels, "moe_decode", lambda *a: calls.append(1) or fused_op(*a))
    fused = layers.moe_add(x, hs, *args)
    assert calls == [1]
    unfused = x + layers.moe(hs, *args)
    assert torch.equal(fused, unfused)
    adjusted = layers.moe_add(x, hs, *args, router_adjust=lambda i, lg: lg.add_(1.0))
    assert adjusted.shape == fused.shape and calls == [1]
