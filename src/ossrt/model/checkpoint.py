"""Writes random gpt-oss checkpoints in the exact released layouts.

Hugging Face layout: `config.json` + `model-0000K-of-0000N.safetensors` + index.
Reference layout: `original/config.json` + `original/model.safetensors`.

Every tensor is drawn from its own generator seeded by (seed, internal name), so the same seed
gives the same bytes, and both layouts of one seed hold identical weights. Files are streamed a
layer at a time (the safetensors format is an 8-byte header length, a JSON header, then raw
bytes), so the 20b preset (~13.8 GB) is written with little memory (see BENCHMARKS.md).
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

from .config import GptOssConfig
from .layout import (Layout, TensorSpec, checkpoint_names, checkpoint_specs, internal_specs,
                     layer_of, to_checkpoint)
from .mxfp4 import SCALE_BIAS

ST_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32",
            torch.uint8: "U8", torch.int64: "I64", torch.int32: "I32"}
DEFAULT_SHARD_BYTES = 4 << 30
E2M1_RMS = math.sqrt(sum(v * v for v in (0, .5, 1, 1.5, 2, 3, 4, 6)) / 8)  # of a uniform nibble


def _generator(seed: int, name: str) -> torch.Generator:
    # torch's CPU generator keeps only 32 bits of a seed: hash seed and name together.
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}".encode()))


def _scale_byte(target_rms: float) -> int:
    """E8M0 exponent byte making uniformly random nibbles have about `target_rms`."""
    return SCALE_BIAS + round(math.log2(target_rms / E2M1_RMS))


def _randn_bf16(shape: tuple[int, ...], g: torch.Generator, std: float, mean: float = 0.0,
                chunk: int = 1 << 24) -> torch.Tensor:
    """Normal values as bf16, drawn in fixed-size fp32 chunks (bounded memory, deterministic)."""
    out = torch.empty(math.prod(shape), dtype=torch.bfloat16)
    for i in range(0, out.numel(), chunk):
        n = min(chunk, out.numel() - i)
        out[i:i + n] = torch.randn(n, generator=g).mul_(std).add_(mean)
    return out.view(shape)


def random_tensor(cfg: GptOssConfig, name: str, spec: TensorSpec, seed: int) -> torch.Tensor:
    """One internal tensor of a random model: finite, scaled so activations stay O(1)."""
    g = _generator(seed, name)
    key = name.rsplit(".", 1)[-1]
    if spec.kind == "blocks":
        return torch.randint(0, 256, spec.shape, generator=g, dtype=torch.uint8)
    if spec.kind == "scales":
        fan_in = cfg.hidden_size if key == "w1_scales" else cfg.intermediate_size
        # w1 is made large enough that the SwiGLU clamps (at swiglu_limit) really trigger.
        gain = 3.0 if key == "w1_scales" else 1.0
        base = _scale_byte(gain / math.sqrt(fan_in))
        jitter = torch.randint(-1, 2, spec.shape, generator=g, dtype=torch.int16)
        return (base + jitter).to(torch.uint8)
    if key in ("norm", "attn_norm", "mlp_norm"):
        return _randn_bf16(spec.shape, g, 0.1, mean=1.0)
    if key in ("embed", "sinks"):
        return _randn_bf16(spec.shape, g, 1.0)
    if key == "unembed":  # logits with a std of about 4: peaked enough for stable argmaxes
        return _randn_bf16(spec.shape, g, 4.0 / math.sqrt(spec.shape[1]))
    if key.endswith("_w"):
        return _randn_bf16(spec.shape, g, 1.0 / math.sqrt(spec.shape[-1]))
    return _randn_bf16(spec.shape, g, 0.1)  # biases


def _units(cfg: GptOssConfig) -> list[list[str]]:
    """Internal names grouped into write units: each global tensor alone, then each layer."""
    specs = internal_specs(cfg)
    layers: list[list[str]] = [[] for _ in range(cfg.num_hidden_layers)]
    globals_: list[list[str]] = []
    for name in specs:
        layer = layer_of(name)
        if layer is None:
            globals_.append([name])
        else:
            layers[layer].append(name)
    return globals_ + layers


def _unit_weights(cfg: GptOssConfig, unit: list[str], seed: int) -> dict[str, torch.Tensor]:
    specs = internal_specs(cfg)
    return {n: random_tensor(cfg, n, specs[n], seed) for n in unit}


def random_weights(cfg: GptOssConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """The whole random model under internal names (for small configs and tests)."""
    out: dict[str, torch.Tensor] = {}
    for unit in _units(cfg):
        out.update(_unit_weights(cfg, unit, seed))
    return out


def _nbytes(spec: TensorSpec) -> int:
    per = 1 if spec.kind != "dense" else 2
    return math.prod(spec.shape) * per


def _st_header(entries: list[tuple[str, TensorSpec]]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, spec in entries:
        n = _nbytes(spec)
        header[name] = {"dtype": "U8" if spec.kind != "dense" else "BF16",
                        "shape": list(spec.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _write_tensor(f, t: torch.Tensor) -> None:
    f.write(t.contiguous().view(torch.uint8).numpy().data)


def write_checkpoint(cfg: GptOssConfig, out: str | Path, *, layout: Layout = "hf",
                     seed: int = 0, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                     progress: Callable[[int], None] | None = None) -> Path:
    """Writes a random checkpoint; returns the folder holding its config.json."""
    root = Path(out) / ("original" if layout == "original" else "")
    root.mkdir(parents=True, exist_ok=True)
    specs = checkpoint_specs(cfg, layout)
    units = _units(cfg)
    by_unit = [[(ck, specs[ck]) for ck in checkpoint_names(cfg, layout, names)]
               for names in units]

    # Whole units go to shards in order; the reference layout is always one file.
    shards: list[list[int]] = [[]]
    size = 0
    for unit in range(len(units)):
        unit_bytes = sum(_nbytes(s) for _, s in by_unit[unit])
        if layout == "hf" and shards[-1] and size + unit_bytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(unit)
        size += unit_bytes

    if layout == "hf":
        files = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
        config = cfg.to_hf_dict()
    else:
        files = ["model.safetensors"]
        config = cfg.to_original_dict()
    weight_map: dict[str, str] = {}
    for fname, shard_units in zip(files, shards):
        entries = [e for u in shard_units for e in by_unit[u]]
        tmp = root / (fname + ".partial")
        with open(tmp, "wb") as f:
            f.write(_st_header(entries))
            for unit in shard_units:
                tensors = to_checkpoint(cfg, layout, _unit_weights(cfg, units[unit], seed),
                                        partial=True)
                for name, spec in by_unit[unit]:
                    t = tensors[name]
                    assert tuple(t.shape) == spec.shape, name
                    _write_tensor(f, t)
                    weight_map[name] = fname
                    if progress:
                        progress(_nbytes(spec))
        os.replace(tmp, root / fname)
    if layout == "hf":
        index = {"metadata": {"total_size": sum(_nbytes(s) for s in specs.values())},
                 "weight_map": dict(sorted(weight_map.items()))}
        (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (root / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return root


def checkpoint_nbytes(cfg: GptOssConfig, layout: Layout) -> int:
    """Bytes of tensor data a checkpoint of this config and layout holds."""
    return sum(_nbytes(spec) for spec in checkpoint_specs(cfg, layout).values())
