"""`kernels.decode_layer`: a decoder layer of decode rows in one native call gives the very
bits of `Block.forward`'s op-by-op path, output and KV cache alike (bf16 or 8-bit projections),
and is taken only where it can (decode rows only, CPU weights, no LoRA, at most
`decode_layer_max_rows` rows)."""

from __future__ import annotations

import pytest
import torch

from ossrt.engine.kv_cache import BlockTable
from ossrt.engine.paged_attention import PagedAttention
from ossrt.model import kernels, layers, load_model, preset, write_checkpoint

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C++ toolchain here")


@pytest.fixture(scope="module", params=[16, 64], ids=["D16", "D64"])
def model_dir(request, tmp_path_factory):  # noqa: ANN001, ANN201 - pytest fixture
    out = tmp_path_factory.mktemp(f"dl{request.param}") / "m"
    write_checkpoint(preset("tiny").replace(vocab_size=1024, head_dim=request.param), out,
                     seed=request.param)
    return out


def _step(cfg, n: int, seed: int, paged):  # noqa: ANN001, ANN202
    """A paged cache with random contents and n decode sequences at scattered positions (one at
    its first token, some past the sliding window), plus their hidden rows and rope."""
    bs, nblocks = 4, 96
    g = torch.Generator().manual_seed(seed)
    storage = paged(cfg, nblocks, g)
    starts = [0, 37, 5, 60, 17, 2, 44, 9, 30][:n]
    ids = torch.randperm(nblocks, generator=g).tolist()
    chunks, used = [], 0
    for start in starts:
        need = start // bs + 1
        chunks.append((start, 1, BlockTable(full=ids[used:used + need],
                                            sliding=ids[used:used + need])))
        used += need
    x = (torch.randn(n, cfg.hidden_size, generator=g) * 3).bfloat16()
    return storage, chunks, x, torch.tensor(starts)


def _pools(storage) -> list[torch.Tensor]:  # noqa: ANN001 - a PagedKVStorage
    return [*storage.k.values(), *storage.v.values()]


@pytest.mark.parametrize("dense", ["bfloat16", "int8"])
@pytest.mark.parametrize("n", [1, 3, 8, 9])
def test_fused_layer_is_bit_identical(model_dir, monkeypatch, random_paged_storage,  # noqa: ANN001
                                      n: int, dense: str) -> None:
    model = load_model(model_dir, "bfloat16", dense_dtype=dense)
    calls = []
    real = kernels.decode_layer
    monkeypatch.setattr(kernels, "decode_layer", lambda *a: calls.append(1) or real(*a))
    storage, chunks, x, pos = _step(model.cfg, n, n, random_paged_storage)
    cos, sin = model.rope.cos_sin(pos)
    start = [p.clone() for p in _pools(storage)]
    for block in model.blocks:  # sliding and full layers
        for p, s in zip(_pools(storage), start):
            p.copy_(s)
        with torch.inference_mode():
            got = block(x, cos, sin, PagedAttention(storage, chunks))
        got_pools = [p.clone() for p in _pools(storage)]
        for p, s in zip(_pools(storage), start):
            p.copy_(s)
        with monkeypatch.context() as m, torch.inference_mode():
            m.setattr(PagedAttention, "native_decode", lambda self, layer: None)
            want = block(x, cos, sin, PagedAttention(storage, chunks))
        assert torch.equal(got, want), block.layer
        for a, b in zip(got_pools, _pools(storage)):
            assert torch.equal(a, b), block.layer
        assert not torch.equal(got_pools[0], start[0]) or not torch.equal(got_pools[1], start[1])
    fused = n <= layers.decode_layer_max_rows(int8=dense == "int8")
    assert len(calls) == (len(model.blocks) if fused else 0)


def test_not_taken_where_it_would_differ(model_dir, monkeypatch,  # noqa: ANN001
                                        random_paged_storage) -> None:
    calls = []
    real = kernels.decode_layer
    monkeypatch.setattr(kernels, "decode_layer", lambda *a: calls.append(1) or real(*a))
    model = load_model(model_dir, "bfloat16", dense_dtype="int8")  # 8-bit q, k, v, o
    storage, chunks, x, pos = _step(model.cfg, 2, 1, random_paged_storage)
    cos, sin = model.rope.cos_sin(pos)
    with torch.inference_mode():
        # more rows than the 8-bit GEMV takes (layers.linear expands the weights to bf16)
        with monkeypatch.context() as m:
            m.setattr(layers, "_Q8_GEMV_MAX_ROWS", 1)
            model.blocks[0](x, cos, sin, PagedAttention(storage, chunks))
        # a prefill chunk in the batch: the backend does not offer the native step
        mixed = chunks + [(0, 3, chunks[0][2])]
        x3 = torch.cat([x, x[:1].repeat(3, 1)])
        c3, s3 = model.rope.cos_sin(torch.cat([pos, torch.arange(3)]))
        assert PagedAttention(storage, mixed).native_decode(0) is None
        bf16 = load_model(model_dir, "bfloat16")
        bf16.blocks[0](x3, c3, s3, PagedAttention(storage, mixed))
    assert calls == []


def test_decode_layer_refuses_bad_slots(model_dir, random_paged_storage) -> None:  # noqa: ANN001
    model = load_model(model_dir, "bfloat16")
    storage, chunks, x, pos = _step(model.cfg, 2, 2, random_paged_storage)
    cos, sin = model.rope.cos_sin(pos)
    attn = PagedAttention(storage, chunks)
    kc, vc, write, read, offsets = attn.native_decode(0)
    with torch.no_grad():
        w = model.blocks[0]._fused_weights(x)
    assert w is not None and model.blocks[0]._fused_weights(x) is None  # autograd on: not fused
    cfg = model.cfg
    args = (cfg.num_experts_per_tok, cfg.rms_norm_eps, 0.125, cfg.swiglu_limit, cfg.swiglu_alpha)
    with pytest.raises(RuntimeError, match="write slot out of range"):
        kernels.decode_layer(x, cos, sin, w, kc, vc, write + kc.shape[0], read, offsets, *args)
    with pytest.raises(RuntimeError, match="write_slots must be"):
        kernels.decode_layer(x, cos, sin, w, kc, vc, write[:1], read, offsets, *args)
    with pytest.raises(RuntimeError, match="19 tensors"):
        kernels.decode_layer(x, cos, sin, w[:-1], kc, vc, write, read, offsets, *args)
