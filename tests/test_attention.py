"""The fast attention path against the reference, and the window/sink contract itself."""

from __future__ import annotations

import pytest
import torch

from ossrt.model.layers import attend, attend_flash, attend_flash_window, attend_reference


@pytest.mark.parametrize("t,s", [(1, 1), (1, 77), (9, 9), (9, 300), (260, 260), (33, 1000)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
def test_flash_path_matches_reference(t, s, dtype, tol):
    g = torch.Generator().manual_seed(t * 1000 + s)
    q = torch.randn(2, t, 8, 16, generator=g).to(dtype)
    k = torch.randn(2, s, 2, 16, generator=g).to(dtype)
    v = torch.randn(2, s, 2, 16, generator=g).to(dtype)
    sinks = torch.randn(8, generator=g).to(dtype)
    fast = attend_flash(q, k, v, sinks, 0.25)
    ref = attend_reference(q.float(), k.float(), v.float(), sinks.float(), s - t, 0, None, 0.25)
    assert fast.dtype == dtype
    assert (fast.float() - ref).abs().max().item() < tol


@pytest.mark.parametrize("t,q_pos0,window", [(2, 0, 4), (40, 0, 4), (37, 3, 8), (130, 0, 128),
                                              (300, 0, 128), (200, 1000, 128), (5, 60, 16)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
def test_window_flash_path_matches_reference(t, q_pos0, window, dtype, tol):
    """Keys end with the queries and start where the first query's window does (the paged
    cache's sliding layers): every chunk boundary, a first chunk shorter than the window, and
    chunks past the cache's start."""
    g = torch.Generator().manual_seed(t + q_pos0)
    s = t + min(q_pos0, window - 1)
    k_pos0 = q_pos0 + t - s
    q = torch.randn(2, t, 8, 16, generator=g).to(dtype)
    k, v = (torch.randn(2, s, 2, 16, generator=g).to(dtype) for _ in range(2))
    sinks = torch.randn(8, generator=g)
    fast = attend_flash_window(q, k, v, sinks, q_pos0, k_pos0, window, 0.25)
    ref = attend_reference(q.float(), k.float(), v.float(), sinks, q_pos0, k_pos0, window, 0.25)
    assert fast.dtype == dtype and fast.shape == q.shape
    assert (fast.float() - ref).abs().max().item() < tol


def test_attend_dispatches_and_respects_window():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 40, 4, 8, generator=g) for _ in range(3))
    sinks = torch.zeros(4)
    full = attend(q, k[:, :, :4], v[:, :, :4], sinks, 0, 0, None, 0.35)
    windowed = attend(q, k[:, :, :4], v[:, :, :4], sinks, 0, 0, 4, 0.35)
    # Query 3 sees keys 0..3 either way; query 39 sees all 40 keys only without a window.
    assert torch.allclose(full[:, 3], windowed[:, 3], atol=1e-6)
    assert not torch.allclose(full[:, 39], windowed[:, 39], atol=1e-3)
    # With a window of 4, query 39 depends only on keys 36..39.
    k2, v2 = k.clone(), v.clone()
    k2[:, :36], v2[:, :36] = 0.0, 0.0
    again = attend(q, k2[:, :, :4], v2[:, :, :4], sinks, 0, 0, 4, 0.35)
    assert torch.allclose(again[:, 39], windowed[:, 39], atol=1e-6)


def test_sink_only_lowers_the_weights():
    """A very negative sink changes nothing; a very large one drives the output to zero."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 6, 2, 8, generator=g) for _ in range(3))
    plain = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
        scale=0.3).transpose(1, 2)
    assert torch.allclose(attend(q, k, v, torch.full((2,), -1e4), 0, 0, None, 0.3), plain,
                          atol=1e-6)
    assert attend(q, k, v, torch.full((2,), 1e4), 0, 0, None, 0.3).abs().max() < 1e-6


@pytest.mark.parametrize("head_dim", [16, 64])
@pytest.mark.parametrize("mix", ["decode only", "decode and prefill"])
def test_paged_attention_batched_decode_matches_reference(monkeypatch, random_paged_storage,
                                                           head_dim, mix):
    """The paged backend in bf16 with its decode rows in one native call (sequences of
    different lengths, one past the sliding window, one at its first token, scattered blocks;
    with a prefill chunk in the middle of the batch or not): every row matches the reference
    path (the same step with the native kernels off) on both layer kinds."""
    from ossrt.engine.kv_cache import BlockTable
    from ossrt.engine.paged_attention import PagedAttention
    from ossrt.model import kernels, preset

    if not kernels.available():
        pytest.skip("native kernels not built")
    cfg = preset("tiny").replace(head_dim=head_dim)
    bs, nblocks = 4, 64
    g = torch.Generator().manual_seed(head_dim)
    storage = random_paged_storage(cfg, nblocks, g)
    ids = torch.randperm(nblocks, generator=g).tolist()
    spans = [(20, 1), (5, 6), (150, 1), (0, 1)] if mix != "decode only" else [
        (20, 1), (150, 1), (0, 1), (63, 1)]
    chunks, used = [], 0
    for start, n in spans:
        need = -(-(start + n) // bs)
        if need > len(ids) - used:
            ids += torch.randperm(nblocks, generator=g).tolist()
        blocks = ids[used:used + need]
        used += need
        chunks.append((start, n, BlockTable(full=list(blocks), sliding=list(blocks))))
    rows = sum(n for _, n in spans)
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    q = torch.randn(rows, hq, head_dim, generator=g).bfloat16()
    k = torch.randn(rows, hkv, head_dim, generator=g).bfloat16()
    v = torch.randn(rows, hkv, head_dim, generator=g).bfloat16()
    sinks = torch.randn(hq, generator=g).bfloat16()
    for layer in (0, 1):  # sliding, full
        got = PagedAttention(storage, chunks)(layer, q, k, v, sinks)
        with monkeypatch.context() as m:
            m.setattr(kernels, "available", lambda: False)
            ref = PagedAttention(storage, chunks)(layer, q, k, v, sinks)
        assert got.shape == q.shape
        assert torch.allclose(got.float(), ref.float(), atol=2e-2, rtol=1e-2), layer
