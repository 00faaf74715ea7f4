"""Fold a LoRA adapter into a full checkpoint in the released (Hugging Face) layout.

Dense weights (attention projections, router): W' = W + scale * B @ A, computed in float32 and
stored in `dtype` (bfloat16 as released: one bf16 rounding of W'; float32: exact up to float
rounding). Tuned experts are dequantized (exact), updated, and re-quantized to MXFP4 with
`ossrt.model.mxfp4.quantize`; the re-quantization error |dequantize(quantize(W')) - W'| is
measured over every tuned expert weight and reported (max and mean). Untouched MXFP4 experts
keep their bytes. Written one layer per safetensors shard, with the index and config.json, so a
merge holds about one layer in memory besides the memory-mapped source.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..model.config import GptOssConfig
from ..model.layout import to_checkpoint
from ..model.loader import read_checkpoint
from ..model.mxfp4 import dequantize, quantize
from .lora import ATTN_MODULES, LoraAdapter, check_adapter
from .peft_io import load_adapter

MERGE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
_DENSE = {"q_proj": "q_w", "k_proj": "k_w", "v_proj": "v_w", "o_proj": "o_w",
          "router": "router_w"}
_EXPERTS = {"gate_up_proj": "w1", "down_proj": "w2"}


@dataclass(frozen=True, slots=True)
class MergeReport:
    out: Path
    dtype: str
    dense_merged: int  # dense weight matrices updated
    experts_requantized: int  # expert weight matrices (per expert) re-quantized
    requant_max_abs_err: float | None  # over re-quantized expert weights; None if none
    requant_mean_abs_err: float | None


def merge_weights(cfg: GptOssConfig, weights: dict[str, torch.Tensor], adapter: LoraAdapter,
                  layer: int, dtype: torch.dtype, errs: list[torch.Tensor]
                  ) -> tuple[dict[str, torch.Tensor], int, int]:
    """One layer's internal tensors with the adapter folded in."""
    p = f"layers.{layer}."
    out: dict[str, torch.Tensor] = {}
    dense = experts = 0
    for name, t in weights.items():
        if name.startswith(p):
            out[name] = t if t.dtype == torch.uint8 else t.to(dtype)
    for module, key in _DENSE.items():
        d = adapter.delta(layer, module)
        if d is not None:
            out[p + key] = (weights[p + key].float() + d).to(dtype)
            dense += 1
    for module, key in _EXPERTS.items():
        pair = adapter.pair(layer, module)
        if pair is None:
            continue
        a, b = (x.detach().float() for x in pair)  # [E, r, in], [E, out, r]
        w = dequantize(weights[p + key + "_blocks"], weights[p + key + "_scales"],
                       torch.float32)  # [E, out, in]
        merged = w + adapter.spec.scale * torch.bmm(b, a)
        blocks, scales = quantize(merged)
        errs.append((dequantize(blocks, scales, torch.float32) - merged).abs().flatten())
        out[p + key + "_blocks"], out[p + key + "_scales"] = blocks, scales
        experts += merged.shape[0]
    return out, dense, experts


def merge_adapter(model_dir: str | Path, adapter: str | Path | LoraAdapter, out: str | Path,
                  dtype: str = "bfloat16") -> MergeReport:
    """Writes `out` (config.json, model-*.safetensors, index): base + adapter."""
    if dtype not in MERGE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(MERGE_DTYPES)}")
    tdtype = MERGE_DTYPES[dtype]
    ckpt = read_checkpoint(model_dir, progress=False)
    cfg, weights = ckpt.config, ckpt.weights
    lora = adapter if isinstance(adapter, LoraAdapter) else load_adapter(adapter)
    check_adapter(cfg, lora)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    n = cfg.num_hidden_layers + 1
    files = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    weight_map: dict[str, str] = {}
    total = 0
    errs: list[torch.Tensor] = []
    dense = experts = 0

    def write(fname: str, internal: dict[str, torch.Tensor]) -> None:
        nonlocal total
        tensors = {k: v.contiguous() for k, v in
                   to_checkpoint(cfg, "hf", internal, partial=True).items()}
        save_file(tensors, str(root / fname), metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()

    write(files[0], {k: weights[k].to(tdtype) for k in ("embed", "unembed", "norm")})
    for layer in range(cfg.num_hidden_layers):
        layer_w, d, e = merge_weights(cfg, weights, lora, layer, tdtype, errs)
        dense, experts = dense + d, experts + e
        write(files[layer + 1], layer_w)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (root / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
    err = torch.cat(errs) if errs else None
    return MergeReport(root, dtype, dense, experts,
                       None if err is None else float(err.max()),
                       None if err is None else float(err.mean()))


__all__ = ["ATTN_MODULES", "MergeReport", "check_adapter", "merge_adapter", "merge_weights"]
