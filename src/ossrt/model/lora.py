"""LoRA adapters at inference: many adapters (and the base model) in one batch.

`LoraWeights` is one adapter ready to serve; `LoraBatch` says which rows of a flat token batch
use which adapter and adds `scale * (x A^T) B^T` to those rows of a projection's output. The
base weights are never touched or copied. Served targets: the attention projections and the
router; adapters on the experts are folded in with `ossrt merge` instead.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

SERVED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "router")
_KEY = re.compile(r"layers\.(\d+)\.([a-z_]+)\.lora_([AB])")


@dataclass(frozen=True)
class LoraWeights:
    """pairs[(layer, module)] = (A [r, in], B [out, r]) in the compute dtype; delta = scale*B@A."""

    scale: float
    pairs: Mapping[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], scale: float,
                     dtype: torch.dtype, device: torch.device | str = "cpu") -> LoraWeights:
        """From tensors keyed `layers.{i}.{module}.lora_A` / `lora_B` (ossrt's adapter keys).
        ValueError for a module that cannot be served (expert LoRA: merge it instead)."""
        found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            m = _KEY.fullmatch(key)
            if m is None:
                raise ValueError(f"unexpected adapter tensor {key!r}")
            layer, module, which = int(m.group(1)), m.group(2), m.group(3)
            if module not in SERVED_MODULES:
                raise ValueError(f"LoRA on {module!r} cannot be served beside the base model; "
                                 "fold it in with `ossrt merge` and serve the merged checkpoint")
            found.setdefault((layer, module), {})[which] = value.detach().to(device, dtype)
        pairs = {}
        for where, ab in found.items():
            if set(ab) != {"A", "B"}:
                raise ValueError(f"adapter for layer {where[0]} {where[1]} lacks lora_A or lora_B")
            pairs[where] = (ab["A"], ab["B"])
        return cls(scale, pairs)

    def check(self, shapes: Mapping[str, tuple[int, int]], num_layers: int) -> None:
        """ValueError unless every pair fits `shapes[module] = (out, in)`."""
        for (layer, module), (a, b) in self.pairs.items():
            out, inp = shapes[module]
            if not 0 <= layer < num_layers:
                raise ValueError(f"adapter names layer {layer}; the model has {num_layers}")
            if a.dim() != 2 or b.dim() != 2 or a.shape[1] != inp or b.shape[0] != out \
                    or a.shape[0] != b.shape[1]:
                raise ValueError(f"adapter layer {layer} {module}: A {tuple(a.shape)}, "
                                 f"B {tuple(b.shape)} do not fit a [{out}, {inp}] weight")


class LoraBatch:
    """Rows of a flat batch [N, ...] grouped by adapter; rows of the base model are absent."""

    def __init__(self, groups: list[tuple[LoraWeights, torch.Tensor]], total_rows: int) -> None:
        self.groups = groups  # (adapter, row indices [n_i] int64)
        self.total_rows = total_rows

    def add(self, layer: int, module: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """y [N, out] += scale * (x [N, in] A^T) B^T on each adapter's rows, in place."""
        for weights, rows in self.groups:
            pair = weights.pairs.get((layer, module))
            if pair is None:
                continue
            a, b = pair
            whole = rows.numel() == self.total_rows
            xs = x if whole else x.index_select(0, rows)
            delta = ((xs.to(a.dtype) @ a.t()) @ b.t()) * weights.scale  # [n_i, out]
            if whole:
                y.add_(delta.to(y.dtype))
            else:
                y.index_add_(0, rows, delta.to(y.dtype))
