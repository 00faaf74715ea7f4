"""The fp32 route for bf16 GEMMs on CPUs without bf16 matrix instructions (`cpu_gemm`): the
same products as torch's bf16 GEMM, summed in fp32 and rounded once, over chunks of W."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ossrt.model import cpu_gemm, kernels, layers
from ossrt.model.mxfp4 import dequantize
from ossrt.model.q8 import Q8Weight


def _close_to_exact(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                    b: torch.Tensor | None) -> None:
    """got is x @ w^T + b rounded to bf16 once: within 1 bf16 step of the float64 product
    (plus fp32 summation error, far below it)."""
    ref = x.double() @ w.double().T + (0 if b is None else b.double())
    assert got.dtype == torch.bfloat16 and got.shape == ref.shape
    err = (got.double() - ref).abs()
    bound = ref.abs() * 2.0 ** -8 + (x.double().abs() @ w.double().abs().T) * 2.0 ** -20
    assert bool((err <= bound).all()), (err - bound).max().item()


@pytest.mark.parametrize("m,n,k", [(1, 5, 32), (9, 600, 64), (130, 70, 96)])
@pytest.mark.parametrize("chunk", [7, None])
def test_linear_f32_matches_exact_product(m: int, n: int, k: int, chunk, monkeypatch) -> None:
    if chunk:  # many chunks and a ragged last one
        monkeypatch.setattr(cpu_gemm, "_rows_per_chunk", lambda rows: chunk)
    g = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(2, m, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16()
    got = cpu_gemm.linear_f32(x, w, b)
    assert got.shape == (2, m, n)
    _close_to_exact(got.view(-1, n), x.view(-1, k), w, b)
    out32 = cpu_gemm.linear_f32(x, w, None, torch.float32)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), x.double() @ w.double().T, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not kernels.available(), reason="no C++ toolchain here")
@pytest.mark.parametrize("chunk", [5, None])
def test_mxfp4_linear_f32_matches_dequantized_product(chunk, monkeypatch) -> None:
    if chunk:
        monkeypatch.setattr(cpu_gemm, "_rows_per_chunk", lambda rows: chunk)
    g = torch.Generator().manual_seed(11)
    n, k = 37, 96
    blocks = torch.randint(0, 256, (n, k // 32, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(120, 130, (n, k // 32), dtype=torch.uint8, generator=g)
    x = torch.randn(20, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16()
    got = cpu_gemm.mxfp4_linear_f32(x, blocks, scales, b)
    _close_to_exact(got, x, dequantize(blocks, scales, torch.float32), b)


def test_route_follows_the_cpu_and_the_override(monkeypatch) -> None:
    cpu_gemm.bf16_via_f32.cache_clear()
    try:
        monkeypatch.setenv("OSSRT_CPU_GEMM", "f32")
        assert cpu_gemm.bf16_via_f32()
        cpu_gemm.bf16_via_f32.cache_clear()
        monkeypatch.setenv("OSSRT_CPU_GEMM", "bf16")
        assert not cpu_gemm.bf16_via_f32()
        cpu_gemm.bf16_via_f32.cache_clear()
        monkeypatch.delenv("OSSRT_CPU_GEMM")
        native_bf16 = (torch.cpu._is_avx512_bf16_supported()
                       or torch.cpu._is_amx_tile_supported())
        assert cpu_gemm.bf16_via_f32() == (not native_bf16)
    finally:
        cpu_gemm.bf16_via_f32.cache_clear()
    x = torch.ones(3, 4, dtype=torch.bfloat16)
    w = torch.ones(5, 4, dtype=torch.bfloat16, requires_grad=True)
    monkeypatch.setattr(cpu_gemm, "bf16_via_f32", lambda: True)
    with torch.no_grad():
        assert cpu_gemm.use_f32(x, w)
        assert not cpu_gemm.use_f32(x.float(), w.detach().float())
    assert not cpu_gemm.use_f32(x, w.detach())  # autograd on: torch's GEMM (training)


def test_linear_takes_the_f32_route_for_many_rows(monkeypatch) -> None:
    """`layers.linear` above the GEMV row count: bf16 and 8-bit weights through linear_f32
    when the route is on; autograd still differentiates through torch's GEMM."""
    calls = []
    real = cpu_gemm.linear_f32
    monkeypatch.setattr(layers, "linear_f32", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 64, generator=g).bfloat16()
    w = torch.randn(48, 64, generator=g).bfloat16()
    b = torch.randn(48, generator=g).bfloat16()
    monkeypatch.setattr(cpu_gemm, "bf16_via_f32", lambda: True)
    q8 = Q8Weight.quantize(w)
    with torch.inference_mode():  # as the engine runs
        _close_to_exact(layers.linear(x, w, b), x, w, b)
        _close_to_exact(layers.linear(x, q8, b), x, q8.dequantize(torch.bfloat16), b)
        assert len(calls) == 2
        if kernels.available():  # up to _GEMV_MAX_ROWS_F32 rows the native GEMV beats fp32
            _close_to_exact(layers.linear(x[:layers._GEMV_MAX_ROWS_F32], w, b),
                            x[:layers._GEMV_MAX_ROWS_F32], w, b)
            assert len(calls) == 2
    # training: x without grad through a frozen base weight, a LoRA-style trainable term
    xg, lora = x.clone(), torch.zeros(48, dtype=torch.bfloat16, requires_grad=True)
    (layers.linear(xg, w, b) + lora).float().sum().backward()
    assert len(calls) == 2 and lora.grad is not None
    monkeypatch.setattr(cpu_gemm, "bf16_via_f32", lambda: False)
    assert torch.equal(layers.linear(x, w, b), F.linear(x, w, b))
    assert len(calls) == 2


@pytest.mark.skipif(not kernels.available(), reason="no C++ toolchain here")
def test_moe_prefill_f32_route_matches_bf16_route(monkeypatch) -> None:
    """Prefill's per-expert GEMMs in fp32 give what torch's bf16 GEMMs give, up to summation
    order (same rounding points: after each GEMM, after SwiGLU)."""
    from test_kernels import prefill_moe_args

    args = prefill_moe_args(monkeypatch)
    monkeypatch.setattr(cpu_gemm, "_rows_per_chunk", lambda rows: 40)
    calls = []
    real = cpu_gemm.mxfp4_linear_f32
    monkeypatch.setattr(layers, "mxfp4_linear_f32", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(cpu_gemm, "bf16_via_f32", lambda: True)
    with torch.no_grad():
        f32 = layers.moe(*args)
    used = len(calls)
    assert used == 2 * 6  # two GEMMs for each of the 6 experts (80 tokens x 2 reach them all)
    monkeypatch.setattr(cpu_gemm, "bf16_via_f32", lambda: False)
    bf16 = layers.moe(*args)
    assert len(calls) == used
    assert f32.dtype == torch.bfloat16 and f32.shape == bf16.shape
    err = (f32.float() - bf16.float()).abs().max().item()
    assert err <= 0.02 * bf16.float().abs().max().item(), err


def test_scratch_made_in_inference_mode_is_writable_outside() -> None:
    """The engine runs under inference_mode; training and tests outside it reuse the same
    thread's buffers."""
    x = torch.randn(3, 32).bfloat16()
    w = torch.randn(4, 32).bfloat16()
    with torch.inference_mode():
        cpu_gemm.scratch(99, 8, (2, 4), torch.float32).fill_(1)
    cpu_gemm.scratch(99, 8, (2, 4), torch.float32).fill_(2)
    with torch.inference_mode():
        a = cpu_gemm.linear_f32(x, w, None)
    torch.testing.assert_close(cpu_gemm.linear_f32(x, w, None), a, rtol=0, atol=0)


@pytest.mark.parametrize("rows", [1, 8, 20])
def test_linear_stays_differentiable_at_gemv_row_counts(rows: int) -> None:
    """The native GEMVs have no backward: with autograd on and x requiring grad, `linear`
    keeps torch's product, and the gradient reaches x."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 64, generator=g).bfloat16().requires_grad_()
    w = torch.randn(48, 64, generator=g).bfloat16()
    layers.linear(x, w).float().sum().backward()
    assert x.grad is not None
    want = w.float().sum(0).expand(rows, 64).bfloat16().float()
    torch.testing.assert_close(x.grad.float(), want)
