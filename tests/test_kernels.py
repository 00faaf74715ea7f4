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


@pytest.mark.parametrize("m,n,k", [(1, 50, 64), (2, 33, 96), (5, 17, 32), (1, 9, 40)])
def test_bf16_linear_matches_float64(m: int, n: int, k: int) -> None:
    g = torch.Generator().manual_seed(m * 7 + n)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16()
    ref = torch.nn.functional.linear(x.double(), w.double(), b.double())
    got = kernels.bf16_linear(x, w, b)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert torch.allclose(got.double(), ref, atol=1e-4, rtol=1e-5)  # fp32 accumulation


def test_model_linear_routes_single_rows_to_the_kernel_with_same_result() -> None:
    from ossrt.model.layers import linear

    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 96, generator=g).bfloat16()
    x = torch.randn(3, 96, generator=g).bfloat16()
    batched = linear(x, w)  # torch path (3 rows)
    rows = torch.cat([linear(x[i:i + 1], w) for i in range(3)])  # kernel path
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
