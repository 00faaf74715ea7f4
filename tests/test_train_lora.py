"""The differentiable training forward: equal to the inference model, packing-exact, and
correct gradients through the MXFP4 experts (dense reference, gradcheck in float64)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ossrt.model import load_model, preset, write_checkpoint
from ossrt.model.layers import attend, swiglu
from ossrt.model.model import GptOss
from ossrt.model.mxfp4 import dequantize, quantize
from ossrt.train.data import Example, collate, pack
from ossrt.train.lora import (LoraAdapter, LoraSpec, attention_masks, mxfp4_linear,
                              segment_attention, train_forward)

ALL = ("attn", "router", "experts")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Iterator[GptOss]:
    path = tmp_path_factory.mktemp("lora") / "tiny"
    write_checkpoint(preset("tiny"), path, seed=3)
    yield load_model(path, "float32")


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 200000, (1, n), generator=torch.Generator().manual_seed(seed))


def _randomize(adapter: LoraAdapter, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in adapter.parameters():
            t.copy_(torch.randn(t.shape, generator=g) * std)


def test_new_adapter_is_the_base_model(model: GptOss) -> None:
    ids = _ids(40, 0)  # 2.5 sliding windows
    ref = model.logits(model(ids))
    adapter = LoraAdapter.create(model.cfg, LoraSpec(targets=ALL))
    with torch.no_grad():
        assert (train_forward(model, adapter, ids) - ref).abs().max() < 1e-4
        assert (train_forward(model, None, ids) - ref).abs().max() < 1e-4


def test_packed_rows_equal_separate_examples(model: GptOss) -> None:
    adapter = LoraAdapter.create(model.cfg, LoraSpec(targets=ALL))
    _randomize(adapter)
    a, b = _ids(30, 1)[0].tolist(), _ids(21, 2)[0].tolist()
    rows = pack([Example(1, tuple(a), (0,) * 30), Example(2, tuple(b), (0,) * 21)], 64)
    assert len(rows) == 1
    batch = collate(rows, model.cfg.pad_token_id)
    with torch.no_grad():
        packed = train_forward(model, adapter, batch.ids, batch.positions, batch.segment)[0]
        alone_a = train_forward(model, adapter, torch.tensor([a]))[0]
        alone_b = train_forward(model, adapter, torch.tensor([b]))[0]
    assert (packed[:30] - alone_a).abs().max() < 1e-4
    assert (packed[30:] - alone_b).abs().max() < 1e-4


def test_segment_attention_matches_attend() -> None:
    g = torch.Generator().manual_seed(0)
    b, t, hq, hkv, d = 2, 37, 4, 2, 8
    q, k, v = (torch.randn(b, t, h, d, generator=g) for h in (hq, hkv, hkv))
    sinks = torch.randn(hq, generator=g)
    pos = torch.arange(t).expand(b, t)
    full, sliding = attention_masks(pos, torch.zeros(b, t, dtype=torch.long), 16)
    for window, mask in ((None, full), (16, sliding)):
        ref = attend(q, k, v, sinks, 0, 0, window, d ** -0.5)
        assert (segment_attention(q, k, v, sinks, mask, d ** -0.5) - ref).abs().max() < 1e-5


def test_mxfp4_linear_gradcheck_float64() -> None:
    g = torch.Generator().manual_seed(0)
    blocks, scales = quantize(torch.randn(6, 64, generator=g))  # W [6, 64]
    x = torch.randn(3, 64, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: mxfp4_linear(x, blocks, scales), (x,))


def _expert(x: torch.Tensor, w1: torch.Tensor | tuple, w2: torch.Tensor | tuple,
            lora: tuple[torch.Tensor, ...], scale: float) -> torch.Tensor:
    """One expert with LoRA on gate_up and down; w1/w2 dense tensors or (blocks, scales)."""
    a1, b1, a2, b2 = lora
    lin = (lambda x, w: mxfp4_linear(x, *w)) if isinstance(w1, tuple) else F.linear
    h = lin(x, w1) + scale * F.linear(F.linear(x, a1), b1)
    a = swiglu(h, 7.0, 1.702)
    return lin(a, w2) + scale * F.linear(F.linear(a, a2), b2)


def test_expert_lora_gradients_through_mxfp4_match_dense_reference() -> None:
    g = torch.Generator().manual_seed(0)
    hdim, idim, r = 64, 32, 4
    p1, p2 = quantize(torch.randn(2 * idim, hdim, generator=g) * 0.2), quantize(
        torch.randn(hdim, idim, generator=g) * 0.2)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(5, hdim, dtype=dtype, generator=g)
        lora = [torch.randn(*s, dtype=dtype, generator=g) * 0.1
                for s in ((r, hdim), (2 * idim, r), (r, idim), (hdim, r))]
        grads = []
        for packed in (True, False):
            xs = x.clone().requires_grad_(True)
            ls = [t.clone().requires_grad_(True) for t in lora]
            w1 = p1 if packed else dequantize(*p1, dtype)
            w2 = p2 if packed else dequantize(*p2, dtype)
            _expert(xs, w1, w2, tuple(ls), 2.0).square().sum().backward()
            grads.append([xs.grad, *(t.grad for t in ls)])
        for got, want in zip(*grads):
            assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
        if dtype == torch.float64:  # and against finite differences
            inputs = tuple(t.clone().requires_grad_(True) for t in (x, *lora))
            assert torch.autograd.gradcheck(
                lambda x, *ls: _expert(x, p1, p2, ls, 2.0), inputs)


def test_all_lora_tensors_get_gradients(model: GptOss) -> None:
    adapter = LoraAdapter.create(model.cfg, LoraSpec(targets=ALL, dropout=0.1))
    _randomize(adapter)
    train_forward(model, adapter, _ids(24, 4), training=True,
                  gradient_checkpointing=True).logsumexp(-1).mean().backward()
    for name, t in adapter.named():
        if "proj" in name and ("gate_up" in name or "down" in name):
            # only experts some token was routed to have a gradient
            assert t.grad is not None and t.grad.abs().sum() > 0, name
        else:
            assert t.grad is not None and bool((t.grad != 0).any()), name


def test_bfloat16_model_and_autocast_train(model: GptOss, tmp_path: Path) -> None:
    write_checkpoint(preset("tiny"), tmp_path / "t", seed=3)
    bf16 = load_model(tmp_path / "t", "bfloat16")
    ids = _ids(20, 5)
    ref = train_forward(model, None, ids).detach()
    for m, autocast in ((bf16, False), (model, True)):
        adapter = LoraAdapter.create(m.cfg, LoraSpec(targets=ALL))
        _randomize(adapter, 0.01)
        logits = train_forward(m, adapter, ids, training=True, autocast_bf16=autocast)
        logits.logsumexp(-1).mean().backward()
        assert all(t.grad is not None and t.grad.dtype == torch.float32
                   and bool(torch.isfinite(t.grad).all()) for t in adapter.parameters())
        # bf16 compute follows the float32 result closely (logits of magnitude ~20)
        assert (logits.detach() - ref).abs().mean() < 0.5


def test_whole_forward_gradient_matches_finite_differences(model: GptOss,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """Autograd through attention, router top-k and MXFP4 experts vs a central difference of
    the loss along a random direction of every LoRA tensor at once. The loss is only piecewise
    smooth (a perturbation that flips some token's top-k routing makes it jump), so the step
    used is the largest one whose two evaluations route every token as the unperturbed one."""
    adapter = LoraAdapter.create(model.cfg, LoraSpec(rank=2, targets=ALL))
    _randomize(adapter, 0.05)
    ids = _ids(12, 6)
    routes: list[torch.Tensor] = []
    topk = torch.topk

    def recording_topk(x: torch.Tensor, k: int, **kw: object):  # noqa: ANN202
        out = topk(x, k, **kw)
        routes.append(out.indices.clone())
        return out

    monkeypatch.setattr(torch, "topk", recording_topk)

    def loss() -> tuple[torch.Tensor, list[torch.Tensor]]:
        routes.clear()
        value = train_forward(model, adapter, ids).logsumexp(-1).mean()
        return value, list(routes)

    value, base_routes = loss()
    value.backward()
    g = torch.Generator().manual_seed(2)
    direction = [torch.randn(t.shape, generator=g) for t in adapter.parameters()]
    analytic = sum(float((t.grad * d).sum()) for t, d in zip(adapter.parameters(), direction))
    numeric = None
    with torch.no_grad():
        for eps in (3e-3, 1e-3, 3e-4, 1e-4):
            values = []
            for sign in (1, -1):
                for t, d in zip(adapter.parameters(), direction):
                    t.add_(sign * eps * d)
                v, r = loss()
                values.append((float(v), all(torch.equal(a, b) for a, b in zip(r, base_routes))))
                for t, d in zip(adapter.parameters(), direction):
                    t.sub_(sign * eps * d)
            if values[0][1] and values[1][1]:
                numeric = (values[0][0] - values[1][0]) / (2 * eps)
                break
    assert numeric is not None, "every step flipped a routing decision"
    assert abs(analytic) > 0.1
    assert abs(numeric - analytic) < 0.02 * abs(analytic), (numeric, analytic, eps)
    served = adapter.to(dtype=torch.bfloat16)
    assert not any(t.requires_grad for t in served.parameters())
    assert served.pair(0, "q_proj")[0].dtype == torch.bfloat16
