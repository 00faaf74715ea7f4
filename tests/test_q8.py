"""The opt-in 8-bit dense mode: storage layout, the native GEMV against the torch reference on
odd shapes and tails, the prefill route, and a whole model whose logits stay near bf16's."""

from __future__ import annotations

import pytest
import torch

from ossrt.engine import SamplingParams
from ossrt.engine.llm_engine import EngineConfig, LLMEngine
from ossrt.model import kernels, layers, load_model, preset, write_checkpoint
from ossrt.model.q8 import Q8Weight, interleave

native = pytest.mark.skipif(not kernels.available(), reason="no C++ toolchain here")


@pytest.mark.parametrize("k", [32, 96, 512, 1024 + 96, 2880])
def test_quantize_round_trip_and_error_bound(k: int) -> None:
    g = torch.Generator().manual_seed(k)
    w = torch.randn(7, k, generator=g).to(torch.bfloat16)
    w[0, :32] = 0  # an all-zero block: scale 0, values 0
    q = Q8Weight.quantize(w)
    assert q.q.dtype == torch.uint8 and q.scale.shape == (7, k // 32)
    assert torch.equal(interleave(interleave(q.q), inverse=True), q.q)
    back = q.dequantize(torch.float32)
    err = (back - w.float()).abs().view(7, k // 32, 32)
    assert (err <= q.scale[..., None] / 2 + 1e-7).all()  # round to nearest: half a step at most
    assert q.scale[0, 0] == 0 and (back[0, :32] == 0).all()
    # the plain-order tail and the interleaved runs hold the same values as a plain quantization
    plain = interleave(q.q, inverse=True)
    assert int(plain.min()) >= 1 and int(plain.max()) <= 255


@native
@pytest.mark.parametrize("k", [64, 544, 2880, 4096])
def test_q8_linear_rows_of_a_batch_equal_their_own_calls(k: int) -> None:
    """1 to 11 rows of x (groups of 4, 3, 2, 1 in one call): every row of the batched result is
    bit for bit the one-row result, for K with and without the plain-order tail (odd blocks)."""
    g = torch.Generator().manual_seed(k)
    w = torch.randn(45, k, generator=g).to(torch.bfloat16)
    q = Q8Weight.quantize(w)
    b = torch.randn(45, generator=g).to(torch.bfloat16)
    for m in (2, 3, 4, 5, 8, 11):
        x = (torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 10).bfloat16()
        got = kernels.q8_linear(x, q.q, q.scale, b)
        one = torch.cat([kernels.q8_linear(x[i:i + 1], q.q, q.scale, b) for i in range(m)])
        assert torch.equal(got, one), m


@native
@pytest.mark.parametrize("m,n,k", [(1, 37, 64), (3, 50, 96), (2, 33, 512), (1, 40, 1120),
                                   (2, 64, 2880)])
def test_q8_linear_matches_dequantized_weights(m: int, n: int, k: int) -> None:
    g = torch.Generator().manual_seed(m * 1000 + k)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    b = torch.randn(n, generator=g).to(torch.bfloat16)
    q = Q8Weight.quantize(w)
    ref = torch.nn.functional.linear(x.double(), q.dequantize(torch.float64), b.double())
    got = kernels.q8_linear(x, q.q, q.scale, b)
    assert got.shape == (m, n) and got.dtype == torch.float32
    # the only difference is x rounded to 8 bits per block: ~1/254 of each block's largest value
    assert (got.double() - ref).abs().max() < 0.02 * ref.abs().max()
    # negative and positive weights alike (an all-negative row, a one-hot x)
    w1 = -torch.arange(1, k + 1, dtype=torch.float32).view(1, k).to(torch.bfloat16)
    q1 = Q8Weight.quantize(w1)
    x1 = torch.zeros(1, k, dtype=torch.bfloat16)
    x1[0, k - 1] = 1
    assert kernels.q8_linear(x1, q1.q, q1.scale, None).item() == pytest.approx(-k, rel=1e-2)
    assert torch.equal(kernels.q8_dequant_bf16(q.q, q.scale), q.dequantize(torch.bfloat16))


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_linear_routes_q8_weights(monkeypatch, rows: int) -> None:
    """Few rows: the native GEMV; many (prefill): bf16 GEMM on the expanded weight; without
    the kernels: the torch reference. All agree with the dequantized weight."""
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(48, 2880, generator=g).to(torch.bfloat16)
    x = torch.randn(rows, 2880, generator=g).to(torch.bfloat16)
    q = Q8Weight.quantize(w)
    ref = torch.nn.functional.linear(x.float(), q.dequantize(torch.float32))
    got = layers.linear(x, q, out_dtype=torch.float32)
    assert got.shape == (rows, 48)
    assert (got - ref).abs().max() < 0.02 * ref.abs().max()
    monkeypatch.setattr(kernels, "available", lambda: False)
    plain = layers.linear(x, q, out_dtype=torch.float32)
    assert (plain - ref).abs().max() < 0.01 * ref.abs().max()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("q8ckpt")
    write_checkpoint(preset("tiny").replace(vocab_size=2048), out, seed=5)
    return out


def test_int8_model_logits_near_bf16_and_serves(tiny_dir) -> None:
    ref = load_model(tiny_dir, "bfloat16")
    q8 = load_model(tiny_dir, "bfloat16", dense_dtype="int8")
    assert q8.dense_dtype == "int8" and isinstance(q8.blocks[0].q_w, Q8Weight)
    assert isinstance(q8.unembed, Q8Weight) and "unembed" not in dict(q8.named_parameters())
    ids = torch.randint(0, 2048, (1, 24), generator=torch.Generator().manual_seed(0))
    a = ref.logits(ref(ids))[0].float()  # prefill route (24 rows)
    b = q8.logits(q8(ids))[0].float()
    rel = (a - b).abs().max() / a.abs().max()
    assert 0 < rel < 0.1, rel  # not the same numbers, but close
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.75
    engine = LLMEngine(q8, EngineConfig(max_num_seqs=2, kv_cache_bytes=1 << 24))  # decode route
    engine.add_request("a", ids[0].tolist(), SamplingParams(temperature=0, max_tokens=6))
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert outs[-1].num_output_tokens == 6
    with pytest.raises(ValueError, match="dense dtype"):
        load_model(tiny_dir, "bfloat16", dense_dtype="int4")
