"""The bandwidth bound: the read loop reads every word, and `step_bytes` counts exactly the
bytes of the tensors a decode step streams (checked against a loaded model's own tensors)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ossrt.model import kernels, load_model, preset, write_checkpoint
from ossrt.model.membw import expected_experts, read_bandwidth, step_bytes
from ossrt.model.q8 import Q8Weight

native = pytest.mark.skipif(not kernels.available(), reason="no C++ toolchain here")


@native
@pytest.mark.parametrize("words", [1, 31, 32, 33, (1 << 15) + 5, 3 * (1 << 15)])
def test_read_xor_reads_every_word(words: int) -> None:
    g = torch.Generator().manual_seed(words)
    t = torch.randint(-(1 << 62), 1 << 62, (words,), dtype=torch.int64, generator=g)
    want = int(np.bitwise_xor.reduce(t.numpy()))
    assert kernels.read_xor(t) == want
    t[words // 2] ^= 1 << 40  # one flipped bit anywhere changes the result
    assert kernels.read_xor(t) == want ^ (1 << 40)
    # any dtype: the same bytes give the same words
    assert kernels.read_xor(t.view(torch.uint8)) == want ^ (1 << 40)


@native
def test_read_xor_refuses_what_it_cannot_read() -> None:
    with pytest.raises(RuntimeError, match="8-byte"):
        kernels.read_xor(torch.zeros(13, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="contiguous"):
        kernels.read_xor(torch.zeros(8, 8, dtype=torch.int64).t())


@native
def test_read_bandwidth_gives_one_rate_per_rep() -> None:
    rates = read_bandwidth(1 << 22, reps=3)
    assert len(rates) == 3 and all(r > 0 and np.isfinite(r) for r in rates)


def test_expected_experts() -> None:
    assert expected_experts(32, 4, 1) == pytest.approx(4)
    assert expected_experts(32, 4, 4) == pytest.approx(32 * (1 - (28 / 32) ** 4))
    assert expected_experts(32, 4, 10_000) == pytest.approx(32)
    # the Monte Carlo count of uniform picks agrees
    g = torch.Generator().manual_seed(0)
    used = [len(torch.cat([torch.randperm(32, generator=g)[:4] for _ in range(8)]).unique())
            for _ in range(2000)]
    assert float(np.mean(used)) == pytest.approx(expected_experts(32, 4, 8), rel=0.02)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):  # noqa: ANN001, ANN201 - pytest fixture
    out = tmp_path_factory.mktemp("membw") / "tiny"
    write_checkpoint(preset("tiny").replace(vocab_size=2048), out, seed=3)
    return out


def _nbytes(t: torch.Tensor | Q8Weight) -> int:
    if isinstance(t, Q8Weight):
        return _nbytes(t.q) + _nbytes(t.scale)
    return t.numel() * t.element_size()


@pytest.mark.parametrize("dense", ["bfloat16", "int8"])
def test_step_bytes_match_the_model_tensors(tiny_dir, dense: str) -> None:  # noqa: ANN001
    model = load_model(tiny_dir, "bfloat16", dense_dtype=dense)
    cfg = model.cfg
    blocks = list(model.blocks)
    want_dense = _nbytes(model.unembed) + sum(
        _nbytes(getattr(b, k)) for b in blocks for k in ("q_w", "k_w", "v_w", "o_w", "router_w"))
    one_expert = sum(_nbytes(getattr(blocks[0], k))
                     for k in ("w1_blocks", "w1_scales", "w2_blocks", "w2_scales"))
    one_expert /= cfg.num_local_experts
    depth = cfg.sliding_window + 5  # sliding layers see the window, full layers all of it
    kv_pos = sum(min(depth, cfg.window(n) or depth) for n in range(cfg.num_hidden_layers))
    got = step_bytes(cfg, 3, depth, dense)
    assert got.dense == pytest.approx(want_dense)
    used = expected_experts(cfg.num_local_experts, cfg.num_experts_per_tok, 3)
    assert got.experts == pytest.approx(cfg.num_hidden_layers * used * one_expert)
    assert got.kv == 3 * kv_pos * 2 * cfg.kv_dim * 2
    assert got.total == pytest.approx(got.dense + got.experts + got.kv)


def test_step_bytes_at_the_20b_shape() -> None:
    b = step_bytes(preset("20b"), 1, 0)
    assert b.dense / 1e9 == pytest.approx(2.44, abs=0.01)  # bf16 attention + unembedding
    assert b.experts / 1e9 == pytest.approx(1.27, abs=0.01)  # 4 experts x 24 layers, MXFP4
    assert step_bytes(preset("20b"), 1, 0, "q8_0").dense < b.dense * 0.54
    with pytest.raises(ValueError, match="dense"):
        step_bytes(preset("20b"), 1, 0, "fp8")
    with pytest.raises(ValueError, match="batch"):
        step_bytes(preset("20b"), 0, 0)
