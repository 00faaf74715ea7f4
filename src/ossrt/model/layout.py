"""Tensor names and shapes of both checkpoint layouts, and their map to ossrt's own names.

ossrt names its weights once (`internal_specs`); each layout is a list of checkpoint tensors
(`checkpoint_specs`) plus two pure functions between the two namings. The reference layout
stores q, k and v as one `qkv` tensor: loading splits it into views (no copy), writing
concatenates.

Internal names (N = layer):
  embed [V, H], unembed [V, H], norm [H]
  layers.N.attn_norm [H], layers.N.{q,k,v,o}_w / _b, layers.N.sinks [Hq]
  layers.N.mlp_norm [H], layers.N.router_w [E, H], layers.N.router_b [E]
  layers.N.w1_blocks [E, 2I, H/32, 16] u8, w1_scales [E, 2I, H/32] u8, w1_bias [E, 2I]
  layers.N.w2_blocks [E, H, I/32, 16] u8,  w2_scales [E, H, I/32] u8,  w2_bias [E, H]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .config import GptOssConfig
from .mxfp4 import BLOCK, BYTES_PER_BLOCK

Layout = Literal["hf", "original"]
Kind = Literal["dense", "blocks", "scales"]
LAYOUTS: tuple[Layout, ...] = ("hf", "original")


@dataclass(frozen=True, slots=True)
class TensorSpec:
    shape: tuple[int, ...]
    kind: Kind  # dense: a float tensor (bf16 in releases); blocks/scales: MXFP4 uint8

    def expected_dtypes(self) -> tuple[torch.dtype, ...]:
        if self.kind == "dense":
            return (torch.bfloat16, torch.float16, torch.float32)
        return (torch.uint8,)


def internal_specs(cfg: GptOssConfig) -> dict[str, TensorSpec]:
    h, i, e, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.vocab_size
    d = lambda *s: TensorSpec(tuple(s), "dense")  # noqa: E731
    specs = {"embed": d(v, h), "unembed": d(v, h), "norm": d(h)}
    for n in range(cfg.num_hidden_layers):
        p = f"layers.{n}."
        specs.update({
            p + "attn_norm": d(h),
            p + "q_w": d(cfg.q_dim, h), p + "q_b": d(cfg.q_dim),
            p + "k_w": d(cfg.kv_dim, h), p + "k_b": d(cfg.kv_dim),
            p + "v_w": d(cfg.kv_dim, h), p + "v_b": d(cfg.kv_dim),
            p + "o_w": d(h, cfg.q_dim), p + "o_b": d(h),
            p + "sinks": d(cfg.num_attention_heads),
            p + "mlp_norm": d(h),
            p + "router_w": d(e, h), p + "router_b": d(e),
            p + "w1_blocks": TensorSpec((e, 2 * i, h // BLOCK, BYTES_PER_BLOCK), "blocks"),
            p + "w1_scales": TensorSpec((e, 2 * i, h // BLOCK), "scales"),
            p + "w1_bias": d(e, 2 * i),
            p + "w2_blocks": TensorSpec((e, h, i // BLOCK, BYTES_PER_BLOCK), "blocks"),
            p + "w2_scales": TensorSpec((e, h, i // BLOCK), "scales"),
            p + "w2_bias": d(e, h),
        })
    return specs


_HF_GLOBAL = {"embed": "model.embed_tokens.weight", "unembed": "lm_head.weight",
              "norm": "model.norm.weight"}
_HF_LAYER = {
    "attn_norm": "input_layernorm.weight", "mlp_norm": "post_attention_layernorm.weight",
    "q_w": "self_attn.q_proj.weight", "q_b": "self_attn.q_proj.bias",
    "k_w": "self_attn.k_proj.weight", "k_b": "self_attn.k_proj.bias",
    "v_w": "self_attn.v_proj.weight", "v_b": "self_attn.v_proj.bias",
    "o_w": "self_attn.o_proj.weight", "o_b": "self_attn.o_proj.bias",
    "sinks": "self_attn.sinks",
    "router_w": "mlp.router.weight", "router_b": "mlp.router.bias",
    "w1_blocks": "mlp.experts.gate_up_proj_blocks", "w1_scales": "mlp.experts.gate_up_proj_scales",
    "w1_bias": "mlp.experts.gate_up_proj_bias",
    "w2_blocks": "mlp.experts.down_proj_blocks", "w2_scales": "mlp.experts.down_proj_scales",
    "w2_bias": "mlp.experts.down_proj_bias",
}
_ORIG_GLOBAL = {"embed": "embedding.weight", "unembed": "unembedding.weight", "norm": "norm.scale"}
_ORIG_LAYER = {
    "attn_norm": "attn.norm.scale", "mlp_norm": "mlp.norm.scale",
    "o_w": "attn.out.weight", "o_b": "attn.out.bias", "sinks": "attn.sinks",
    "router_w": "mlp.gate.weight", "router_b": "mlp.gate.bias",
    "w1_blocks": "mlp.mlp1_weight.blocks", "w1_scales": "mlp.mlp1_weight.scales",
    "w1_bias": "mlp.mlp1_bias",
    "w2_blocks": "mlp.mlp2_weight.blocks", "w2_scales": "mlp.mlp2_weight.scales",
    "w2_bias": "mlp.mlp2_bias",
}


def _name_map(cfg: GptOssConfig, layout: Layout) -> dict[str, str]:
    """internal name -> checkpoint name, for every tensor stored one-to-one."""
    glob, per_layer, prefix = (
        (_HF_GLOBAL, _HF_LAYER, "model.layers.{}.") if layout == "hf"
        else (_ORIG_GLOBAL, _ORIG_LAYER, "block.{}.")
    )
    out = dict(glob)
    for n in range(cfg.num_hidden_layers):
        out.update({f"layers.{n}.{k}": prefix.format(n) + v for k, v in per_layer.items()})
    return out


def checkpoint_specs(cfg: GptOssConfig, layout: Layout) -> dict[str, TensorSpec]:
    """Every tensor a checkpoint of this layout must hold: checkpoint name -> spec."""
    internal = internal_specs(cfg)
    out = {ck: internal[k] for k, ck in _name_map(cfg, layout).items()}
    if layout == "original":
        qkv = cfg.q_dim + 2 * cfg.kv_dim
        for n in range(cfg.num_hidden_layers):
            out[f"block.{n}.attn.qkv.weight"] = TensorSpec((qkv, cfg.hidden_size), "dense")
            out[f"block.{n}.attn.qkv.bias"] = TensorSpec((qkv,), "dense")
    return out


def checkpoint_names(cfg: GptOssConfig, layout: Layout, names: list[str]) -> list[str]:
    """Checkpoint names holding these internal tensors (whole layers or globals), sorted."""
    nm = _name_map(cfg, layout)
    out = {nm[n] for n in names if n in nm}
    if layout == "original":
        for n in names:
            layer = layer_of(n)
            if layer is not None and n.endswith(("q_w", "k_w", "v_w", "q_b", "k_b", "v_b")):
                part = "weight" if n.endswith("_w") else "bias"
                out.add(f"block.{layer}.attn.qkv.{part}")
    return sorted(out)


def from_checkpoint(cfg: GptOssConfig, layout: Layout,
                    tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint-named tensors -> internal names (views, never copies)."""
    out = {k: tensors[ck] for k, ck in _name_map(cfg, layout).items()}
    if layout == "original":
        splits = [cfg.q_dim, cfg.kv_dim, cfg.kv_dim]
        for n in range(cfg.num_hidden_layers):
            for part in ("weight", "bias"):
                q, k, v = torch.split(tensors[f"block.{n}.attn.qkv.{part}"], splits, dim=0)
                suffix = "w" if part == "weight" else "b"
                out.update({f"layers.{n}.q_{suffix}": q, f"layers.{n}.k_{suffix}": k,
                            f"layers.{n}.v_{suffix}": v})
    return out


def to_checkpoint(cfg: GptOssConfig, layout: Layout, weights: dict[str, torch.Tensor],
                  *, partial: bool = False) -> dict[str, torch.Tensor]:
    """Internal-named tensors -> checkpoint names (the reference layout concatenates qkv).

    With `partial`, `weights` may hold any subset of whole layers (and the global tensors).
    """
    out = {ck: weights[k] for k, ck in _name_map(cfg, layout).items()
           if not partial or k in weights}
    if layout == "original":
        for n in range(cfg.num_hidden_layers):
            p = f"layers.{n}."
            if partial and p + "q_w" not in weights:
                continue
            for part, suffix in (("weight", "w"), ("bias", "b")):
                out[f"block.{n}.attn.qkv.{part}"] = torch.cat(
                    [weights[p + f"q_{suffix}"], weights[p + f"k_{suffix}"],
                     weights[p + f"v_{suffix}"]], dim=0)
    return out


def layer_of(name: str) -> int | None:
    """The layer index a checkpoint or internal tensor name belongs to, if any."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("layers", "block") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None
