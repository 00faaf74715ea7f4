"""LoRA adapters for gpt-oss and a differentiable training forward.

An adapter adds `scale * B @ A` (scale = alpha / r) to a frozen weight W [out, in]:
A [r, in] (uniform in +-1/sqrt(in), as PEFT's default), B [out, r] zero, so a new adapter is
the base model exactly. Targets:
- "attn": q_proj, k_proj, v_proj, o_proj of every layer (the default);
- "router": the router [E, H] (A [r, H], B [E, r]);
- "experts": per expert, gate_up_proj (W1 [2I, H], rows interleaved gate/linear as stored:
  A [E, r, H], B [E, 2I, r]) and down_proj (W2 [H, I]: A [E, r, I], B [E, H, r]).
  The MXFP4 experts stay packed: `mxfp4_linear` dequantizes inside autograd (again in the
  backward pass instead of keeping the dense weight), so gradients reach the LoRA parameters
  and the input while the packed bytes stay frozen.

`train_hidden` / `train_forward` reuse ossrt.model.layers (rms_norm, YarnRope, swiglu, linear)
in plain autograd. Attention is `segment_attention`: attend_reference's math (sinks, sliding
windows) with a block-diagonal mask, so packed examples never see each other; for one segment
it equals `ossrt.model.layers.attend` (tested). `attend` itself is not used because its fast
path (torch's fused CPU flash kernel plus a log-sum-exp merge for the sink) has no backward
for the log-sum-exp output and it cannot mask by segment.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..model.config import SLIDING, GptOssConfig
from ..model.layers import YarnRope, linear, rms_norm, swiglu
from ..model.model import Block, GptOss
from ..model.mxfp4 import dequantize

TARGETS = ("attn", "router", "experts")
ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_MODULES = ("gate_up_proj", "down_proj")


@dataclass(frozen=True, slots=True)
class LoraSpec:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("attn",)

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ValueError("LoRA rank must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("LoRA dropout must be in [0, 1)")
        bad = sorted(set(self.targets) - set(TARGETS))
        if bad or not self.targets:
            raise ValueError(f"unknown LoRA targets {bad}; choose from {', '.join(TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def modules(self) -> tuple[str, ...]:
        """Per-layer module names this spec adapts."""
        out: tuple[str, ...] = ()
        if "attn" in self.targets:
            out += ATTN_MODULES
        if "router" in self.targets:
            out += ("router",)
        if "experts" in self.targets:
            out += EXPERT_MODULES
        return out


def module_shapes(cfg: GptOssConfig, module: str) -> tuple[int, int, int | None]:
    """(out, in, experts or None) of a module's frozen weight."""
    h, i, e = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
    return {"q_proj": (cfg.q_dim, h, None), "k_proj": (cfg.kv_dim, h, None),
            "v_proj": (cfg.kv_dim, h, None), "o_proj": (h, cfg.q_dim, None),
            "router": (e, h, None), "gate_up_proj": (2 * i, h, e),
            "down_proj": (h, i, e)}[module]


class LoraAdapter:
    """LoRA tensors keyed `layers.{i}.{module}.lora_A` / `.lora_B` (float32 leaf tensors).

    Dense modules: A [r, in], B [out, r]; expert modules: A [E, r, in], B [E, out, r].
    """

    def __init__(self, spec: LoraSpec, num_layers: int,
                 tensors: dict[str, torch.Tensor]) -> None:
        self.spec, self.num_layers, self.tensors = spec, num_layers, tensors

    @classmethod
    def create(cls, cfg: GptOssConfig, spec: LoraSpec, seed: int = 0,
               device: torch.device | str = "cpu") -> LoraAdapter:
        g = torch.Generator().manual_seed(seed)
        tensors: dict[str, torch.Tensor] = {}
        for layer in range(cfg.num_hidden_layers):
            for m in spec.modules():
                out, inp, e = module_shapes(cfg, m)
                lead = () if e is None else (e,)
                bound = 1.0 / math.sqrt(inp)
                a = (torch.rand(*lead, spec.rank, inp, generator=g) * 2 - 1) * bound
                b = torch.zeros(*lead, out, spec.rank)
                tensors[f"layers.{layer}.{m}.lora_A"] = a.to(device).requires_grad_(True)
                tensors[f"layers.{layer}.{m}.lora_B"] = b.to(device).requires_grad_(True)
        return cls(spec, cfg.num_hidden_layers, tensors)

    def pair(self, layer: int, module: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A, B) of one layer's module, or None when it is not adapted."""
        a = self.tensors.get(f"layers.{layer}.{module}.lora_A")
        return None if a is None else (a, self.tensors[f"layers.{layer}.{module}.lora_B"])

    def parameters(self) -> list[torch.Tensor]:
        return [self.tensors[k] for k in sorted(self.tensors)]

    def named(self) -> Iterator[tuple[str, torch.Tensor]]:
        for k in sorted(self.tensors):
            yield k, self.tensors[k]

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> LoraAdapter:
        """A frozen copy (no grad) on `device` in `dtype`, e.g. for serving."""
        return LoraAdapter(self.spec, self.num_layers, {
            k: v.detach().to(device=device, dtype=dtype) for k, v in self.tensors.items()})

    def delta(self, layer: int, module: str, expert: int | None = None) -> torch.Tensor | None:
        """scale * B @ A in float32: [out, in] (an expert's when `expert` is given)."""
        p = self.pair(layer, module)
        if p is None:
            return None
        a, b = p
        if expert is not None:
            a, b = a[expert], b[expert]
        return self.spec.scale * (b.detach().float() @ a.detach().float())


def check_adapter(cfg: GptOssConfig, adapter: LoraAdapter) -> None:
    """Raises ValueError unless every adapter tensor fits this model's shapes."""
    problems = []
    for name, t in adapter.named():
        _, layer, module, ab = name.split(".")
        if int(layer) >= cfg.num_hidden_layers:
            problems.append(f"{name}: the model has {cfg.num_hidden_layers} layers")
            continue
        out, inp, e = module_shapes(cfg, module)
        r = adapter.spec.rank
        want = (r, inp) if ab == "lora_A" else (out, r)
        if e is not None:
            want = (e, *want)
        if tuple(t.shape) != want:
            problems.append(f"{name}: shape {tuple(t.shape)}, expected {want}")
    if problems:
        raise ValueError("adapter does not fit the model:\n  " + "\n  ".join(problems))


class _MXFP4Linear(torch.autograd.Function):
    """x [n, in] @ dequantize(blocks, scales)^T -> [n, out]; the weight is frozen and
    re-dequantized in backward (only the packed bytes are kept)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, blocks: torch.Tensor,  # type: ignore[override]
                scales: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(blocks, scales)
        return F.linear(x, dequantize(blocks, scales, x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        blocks, scales = ctx.saved_tensors
        return grad @ dequantize(blocks, scales, grad.dtype), None, None


def mxfp4_linear(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Differentiable in x; blocks [out, in/32, 16], scales [out, in/32] uint8, frozen."""
    return _MXFP4Linear.apply(x, blocks, scales)


def _lora(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
          dropout: float, training: bool) -> torch.Tensor:
    """scale * B (A dropout(x)) in x's dtype; x [n, in], A [r, in], B [out, r]."""
    if dropout and training:
        x = F.dropout(x, dropout, training=True)
    return F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype)) * scale


def _adapted(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, adapter: LoraAdapter | None,
             layer: int, module: str, training: bool) -> torch.Tensor:
    y = F.linear(x, w, bias)
    if adapter is not None and (p := adapter.pair(layer, module)) is not None:
        y = y + _lora(x, p[0], p[1], adapter.spec.scale, adapter.spec.dropout, training)
    return y


def attention_masks(positions: torch.Tensor, segment: torch.Tensor,
                    window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(full, sliding) boolean masks [B, T, T]: key j visible to query i iff both are in the
    same segment, j <= i, and (sliding only) i - j < window in positions."""
    t = positions.shape[1]
    idx = torch.arange(t, device=positions.device)
    causal = idx[None, :, None] >= idx[None, None, :]  # [1, T, T]
    full = causal & (segment[:, :, None] == segment[:, None, :])  # [B, T, T]
    dist = positions[:, :, None] - positions[:, None, :]
    return full, full & (dist < window)


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
                      visible: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, T, Hq, D], k/v [B, T, Hkv, D], visible [B, T, T] -> [B, T, Hq, D].

    attend_reference's math: each head's sink logit joins the softmax denominator only.
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    qh = q.view(b, t, hkv, g, d).permute(0, 2, 3, 1, 4)  # [B, Hkv, G, T, D]
    kh = k.permute(0, 2, 1, 3).unsqueeze(2)  # [B, Hkv, 1, T, D]
    vh = v.permute(0, 2, 1, 3).unsqueeze(2)  # [B, Hkv, 1, T, D]
    sink = sinks.float().view(1, hkv, g, 1, 1)
    scores = (qh @ kh.transpose(-1, -2)).float() * scale  # [B, Hkv, G, T, T]
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    m = torch.maximum(scores.amax(-1, keepdim=True), sink).detach()
    e = torch.exp(scores - m)
    p = e / (e.sum(-1, keepdim=True) + torch.exp(sink - m))
    out = p.to(v.dtype) @ vh  # [B, Hkv, G, T, D]
    return out.permute(0, 3, 1, 2, 4).reshape(b, t, hq, d)


def _moe(block: Block, x: torch.Tensor, adapter: LoraAdapter | None,
         training: bool) -> torch.Tensor:
    """Differentiable MoE: x [N, H] -> [N, H]; `ossrt.model.layers.moe`'s math."""
    cfg, layer = block.cfg, block.layer
    k = cfg.num_experts_per_tok
    logits = _adapted(x, block.router_w, block.router_b, adapter, layer, "router", training)
    top, idx = torch.topk(logits, k, dim=-1)  # [N, K]
    weights = torch.softmax(top.float(), dim=-1).to(x.dtype).flatten()  # [N*K]
    flat = idx.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=cfg.num_local_experts).tolist()
    w1 = adapter.pair(layer, "gate_up_proj") if adapter is not None else None
    w2 = adapter.pair(layer, "down_proj") if adapter is not None else None
    scale = adapter.spec.scale if adapter is not None else 1.0
    drop = adapter.spec.dropout if adapter is not None else 0.0
    out = torch.zeros_like(x)
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        sel = order[start:start + c]
        start += c
        rows = sel // k  # [c]
        xe = x[rows]  # [c, H]
        hgate = mxfp4_linear(xe, block.w1_blocks[e], block.w1_scales[e]) + block.w1_bias[e]
        if w1 is not None:
            hgate = hgate + _lora(xe, w1[0][e], w1[1][e], scale, drop, training)
        a = swiglu(hgate, cfg.swiglu_limit, cfg.swiglu_alpha)  # [c, I]
        y = mxfp4_linear(a, block.w2_blocks[e], block.w2_scales[e]) + block.w2_bias[e]
        if w2 is not None:
            y = y + _lora(a, w2[0][e], w2[1][e], scale, drop, training)
        out = out.index_add(0, rows, y * weights[sel, None])
    return out


def _block(block: Block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           visible: torch.Tensor, adapter: LoraAdapter | None, training: bool) -> torch.Tensor:
    """x [B, T, H] -> [B, T, H]: Block.forward's math with LoRA and segment masks."""
    cfg, layer = block.cfg, block.layer
    b, t, _ = x.shape
    xf = x.reshape(b * t, -1)  # [N, H]
    h = rms_norm(xf, block.attn_norm, cfg.rms_norm_eps)
    q = _adapted(h, block.q_w, block.q_b, adapter, layer, "q_proj", training)
    k = _adapted(h, block.k_w, block.k_b, adapter, layer, "k_proj", training)
    v = _adapted(h, block.v_w, block.v_b, adapter, layer, "v_proj", training)
    q = YarnRope.apply(q.view(b * t, cfg.num_attention_heads, cfg.head_dim), cos, sin)
    k = YarnRope.apply(k.view(b * t, cfg.num_key_value_heads, cfg.head_dim), cos, sin)
    v = v.view(b * t, cfg.num_key_value_heads, cfg.head_dim)
    o = segment_attention(q.view(b, t, *q.shape[1:]), k.view(b, t, *k.shape[1:]),
                          v.view(b, t, *v.shape[1:]), block.sinks, visible,
                          cfg.head_dim ** -0.5)  # [B, T, Hq, D]
    xf = xf + _adapted(o.reshape(b * t, -1), block.o_w, block.o_b, adapter, layer, "o_proj",
                       training)
    h = rms_norm(xf, block.mlp_norm, cfg.rms_norm_eps)
    return (xf + _moe(block, h, adapter, training)).view(b, t, -1)


def train_hidden(model: GptOss, adapter: LoraAdapter | None, ids: torch.Tensor,
                 positions: torch.Tensor | None = None, segment: torch.Tensor | None = None,
                 *, training: bool = False, gradient_checkpointing: bool = False,
                 autocast_bf16: bool = False) -> torch.Tensor:
    """ids [B, T] -> final-normed hidden [B, T, H], differentiable in the adapter.

    positions [B, T] (default 0..T-1) and segment [B, T] (default all 0) describe packed rows:
    attention stays within a segment. `training` turns LoRA dropout on.
    """
    cfg = model.cfg
    ids = ids.to(model.device)
    b, t = ids.shape
    if positions is None:
        positions = torch.arange(t, device=model.device).expand(b, t)
    if segment is None:
        segment = torch.zeros(b, t, dtype=torch.int64, device=model.device)
    positions, segment = positions.to(model.device), segment.to(model.device)
    full, sliding = attention_masks(positions, segment, cfg.sliding_window)
    cos, sin = model.rope.cos_sin(positions.reshape(-1))  # [N, D/2]
    ctx = (torch.autocast(model.device.type, dtype=torch.bfloat16) if autocast_bf16
           else nullcontext())
    with ctx:
        x = F.embedding(ids, model.embed)  # [B, T, H]
        for block in model.blocks:
            visible = sliding if cfg.layer_types[block.layer] == SLIDING else full
            if gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(_block, block, x, cos, sin, visible, adapter, training,
                               use_reentrant=False)
            else:
                x = _block(block, x, cos, sin, visible, adapter, training)
        return rms_norm(x, model.norm, cfg.rms_norm_eps)


def output_logits(model: GptOss, hidden: torch.Tensor) -> torch.Tensor:
    """hidden [..., H] -> float32 logits [..., V], differentiable."""
    return linear(hidden, model.unembed, out_dtype=torch.float32)


def train_forward(model: GptOss, adapter: LoraAdapter | None, ids: torch.Tensor,
                  positions: torch.Tensor | None = None, segment: torch.Tensor | None = None,
                  **kwargs: bool) -> torch.Tensor:
    """ids [B, T] -> logits [B, T, V] float32 (see `train_hidden`)."""
    return output_logits(model, train_hidden(model, adapter, ids, positions, segment, **kwargs))


@torch.no_grad()
def apply_lora_logits(model: GptOss, adapter: LoraAdapter | None,
                      ids: torch.Tensor) -> torch.Tensor:
    """Inference with an adapter (no dropout, no cache): ids [B, T] -> logits [B, T, V]."""
    return train_forward(model, adapter, ids)


@torch.no_grad()
def greedy_decode(model: GptOss, adapter: LoraAdapter | None, prompt: list[int],
                  max_tokens: int, stop: tuple[int, ...] = ()) -> list[int]:
    """Greedy continuation with the adapter (full recompute per token: for tests and demos)."""
    ids = list(prompt)
    out: list[int] = []
    for _ in range(max_tokens):
        hidden = train_hidden(model, adapter, torch.tensor([ids]))[:, -1]
        nxt = int(output_logits(model, hidden).argmax(-1))
        out.append(nxt)
        ids.append(nxt)
        if nxt in stop:
            break
    return out
