"""The gpt-oss transformer: token ids in, hidden states and logits out.

`GptOss.forward(ids, start, cache)` runs B sequences of T new tokens at positions start.. and
returns final-normed hidden states; `GptOss.logits` maps any of them to vocabulary logits.
Dense weights are used in the compute dtype; expert weights stay MXFP4-packed. On the CPU,
`load_model` moves the large weights out of the checkpoint's mapping into huge pages
(`GptOss.to_hugepages`), one tensor at a time, so that no weight is ever resident twice.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from . import hugepages, kernels
from .config import GptOssConfig
from .layers import (YarnRope, add_rms_norm, attend, decode_layer_max_rows, linear, moe_add,
                     rms_norm)
from .loader import Checkpoint, read_checkpoint
from .lora import LoraBatch
from .q8 import Q8Weight

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


class KVCache:
    """Contiguous keys and values for B sequences that advance together.

    k[layer], v[layer]: [B, capacity, Hkv, D], post-RoPE; positions 0..length-1 are filled.
    (The engine's paged, window-aware cache replaces this for serving.)
    """

    def __init__(self, cfg: GptOssConfig, batch: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        if capacity > cfg.max_position_embeddings:
            raise ValueError(f"capacity {capacity} exceeds the model's context of "
                             f"{cfg.max_position_embeddings} tokens")
        shape = (batch, capacity, cfg.num_key_value_heads, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in cfg.layer_types]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in cfg.layer_types]
        self.capacity = capacity
        self.length = 0


class AttentionBackend(Protocol):
    """Where keys and values live. Called once per layer per forward with the new tokens."""

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 sinks: torch.Tensor) -> torch.Tensor:
        """q [N, Hq, D], k/v [N, Hkv, D] post-RoPE for this step's N tokens -> [N, Hq, D]."""
        ...


# A backend may also offer `native_decode(layer)`: (kc, vc [slots, Hkv, D] bf16, write_slots
# [N], read_slots, offsets [N + 1]), what `kernels.decode_layer` needs to run the layer's
# attention itself, or None to be called as above (`PagedAttention.native_decode`).

_FUSED = ("attn_norm", "q_w", "q_b", "k_w", "k_b", "v_w", "v_b", "sinks", "o_w", "o_b",
          "mlp_norm", "router_w", "router_b", "w1_blocks", "w1_scales", "w1_bias", "w2_blocks",
          "w2_scales", "w2_bias")  # `kernels.decode_layer`'s weights, in its order


class ContiguousAttention:
    """B sequences of T new tokens at positions start.., optionally with a `KVCache`."""

    def __init__(self, cfg: GptOssConfig, batch: int, t: int, start: int,
                 cache: KVCache | None) -> None:
        self.cfg, self.b, self.t, self.start, self.cache = cfg, batch, t, start, cache

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 sinks: torch.Tensor) -> torch.Tensor:
        b, t, start, window = self.b, self.t, self.start, self.cfg.window(layer)
        q = q.view(b, t, *q.shape[1:])  # [B, T, Hq, D]
        k, v = k.view(b, t, *k.shape[1:]), v.view(b, t, *v.shape[1:])  # [B, T, Hkv, D]
        k_pos0 = start
        if self.cache is not None:
            ck, cv = self.cache.k[layer], self.cache.v[layer]
            ck[:, start:start + t] = k
            cv[:, start:start + t] = v
            k_pos0 = 0 if window is None else max(0, start - window + 1)
            k, v = ck[:, k_pos0:start + t], cv[:, k_pos0:start + t]
        o = attend(q, k, v, sinks, start, k_pos0, window, self.cfg.head_dim ** -0.5)
        return o.reshape(b * t, *o.shape[2:])


class Block(nn.Module):
    def __init__(self, cfg: GptOssConfig, layer: int, w: dict[str, torch.Tensor],
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        p = f"layers.{layer}."
        for key in ("attn_norm", "q_w", "q_b", "k_w", "k_b", "v_w", "v_b", "o_w", "o_b",
                    "sinks", "mlp_norm", "router_w", "router_b", "w1_bias", "w2_bias"):
            setattr(self, key, nn.Parameter(w[p + key].to(dtype), requires_grad=False))
        for key in ("w1_blocks", "w1_scales", "w2_blocks", "w2_scales"):
            self.register_buffer(key, w[p + key], persistent=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn: AttentionBackend, lora: LoraBatch | None = None) -> torch.Tensor:
        """x [N, H] -> [N, H]; cos/sin [N, D/2] for each token's position; `lora` adds the
        adapters of the rows that use one."""
        cfg, layer = self.cfg, self.layer
        n = x.shape[0]
        if lora is None and 0 < n <= decode_layer_max_rows():
            native = getattr(attn, "native_decode", None)
            fused = native(layer) if native is not None else None
            w = self._fused_weights(x) if fused is not None else None
            if w is not None:  # one native call, the same ops as below
                return kernels.decode_layer(x, cos, sin, w, *fused, cfg.num_experts_per_tok,
                                            cfg.rms_norm_eps, cfg.head_dim ** -0.5,
                                            cfg.swiglu_limit, cfg.swiglu_alpha)
        h = rms_norm(x, self.attn_norm, cfg.rms_norm_eps)
        q, k, v = (linear(h, self.q_w, self.q_b), linear(h, self.k_w, self.k_b),
                   linear(h, self.v_w, self.v_b))  # [N, Hq*D], [N, Hkv*D] x2
        if lora is not None:
            for name, y in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                lora.add(layer, name, h, y)
        q = q.view(n, cfg.num_attention_heads, cfg.head_dim)
        k = k.view(n, cfg.num_key_value_heads, cfg.head_dim)
        v = v.view(n, cfg.num_key_value_heads, cfg.head_dim)
        q, k = YarnRope.apply_qk(q, k, cos, sin)
        o = attn(layer, q, k, v, self.sinks).reshape(n, -1)  # [N, Hq*D]
        out = linear(o, self.o_w, self.o_b)
        if lora is not None:
            lora.add(layer, "o_proj", o, out)
        x, h = add_rms_norm(x, out, self.mlp_norm, cfg.rms_norm_eps)
        router = None if lora is None else (
            lambda inp, logits: lora.add(layer, "router", inp, logits))
        return moe_add(x, h, self.router_w, self.router_b, cfg.num_experts_per_tok,
                       self.w1_blocks, self.w1_scales, self.w1_bias,
                       self.w2_blocks, self.w2_scales, self.w2_bias,
                       cfg.swiglu_limit, cfg.swiglu_alpha, router)

    def _fused_weights(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        """This layer's weights for `kernels.decode_layer` (with 8-bit projections: their
        values in place, their scales appended), or None where it cannot run them bit for bit
        as `forward` would: not CPU bf16, autograd on, more rows than the 8-bit GEMV takes."""
        if (torch.is_grad_enabled() or x.dtype != torch.bfloat16 or not x.is_cpu
                or not kernels.available()):
            return None
        params, bufs, attrs = self._parameters, self._buffers, self.__dict__
        ts, scales = [], []
        for i, key in enumerate(_FUSED):
            t = params[key] if key in params else bufs[key] if key in bufs else attrs.get(key)
            if isinstance(t, Q8Weight):
                scales.append(t.scale)
                t = t.q
            elif t is not None and i < 13 and t.dtype != torch.bfloat16:
                return None
            if t is None or not t.is_cpu:
                return None
            ts.append(t)
        if scales and (len(scales) != 4 or x.shape[0] > decode_layer_max_rows(int8=True)):
            return None
        return ts + scales


class GptOss(nn.Module):
    def __init__(self, cfg: GptOssConfig, weights: dict[str, torch.Tensor],
                 dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.cfg, self.dtype = cfg, dtype
        self.dense_dtype = "bfloat16"  # or "int8" after `quantize_dense`
        self.embed = nn.Parameter(weights["embed"].to(dtype), requires_grad=False)
        self.unembed = nn.Parameter(weights["unembed"].to(dtype), requires_grad=False)
        self.norm = nn.Parameter(weights["norm"].to(dtype), requires_grad=False)
        self.blocks = nn.ModuleList(Block(cfg, n, weights, dtype)
                                    for n in range(cfg.num_hidden_layers))
        self.rope = YarnRope(cfg)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, dtype: torch.dtype = torch.bfloat16,
                        device: torch.device | str = "cpu") -> GptOss:
        model = cls(ckpt.config, ckpt.weights, dtype)
        return model.to(device) if torch.device(device).type != "cpu" else model

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def quantize_dense(self) -> None:
        """Opt-in 8-bit dense mode: the attention projections and the unembedding become
        `Q8Weight`s (half the bytes read per decoded token); the bf16 tensors are released.
        The embedding (a row lookup), norms, router, sinks and biases stay as they are."""
        files = hugepages.file_mappings()
        for block in self.blocks:
            for key in ("q_w", "k_w", "v_w", "o_w"):
                q8 = Q8Weight.quantize(getattr(block, key))
                hugepages.drop(getattr(block, key), files)
                delattr(block, key)
                setattr(block, key, q8)
        q8 = Q8Weight.quantize(self.unembed)
        hugepages.drop(self.unembed, files)
        del self.unembed
        self.unembed = q8
        self.dense_dtype = "int8"

    def to_hugepages(self) -> bool:
        """CPU only: moves every large weight (parameters, expert buffers, 8-bit weights) into
        transparent huge pages, where decode streams it about twice as fast as from the
        checkpoint's 4 KiB page-cache mapping; the mapping's pages are released as each tensor
        is copied, so no weight is resident twice (`hugepages`). Skipped (False) where the
        weights would not fit in available memory: mapped, they can still be paged."""
        if self.device.type != "cpu" or not hugepages.enabled():
            return False
        q8 = [(m, name, w) for m in self.modules() for name, w in vars(m).items()
              if isinstance(w, Q8Weight)]
        weights = [*self.parameters(), *self.buffers(), *(t for *_, w in q8 for t in (w.q, w.scale))]
        need = sum(t.numel() * t.element_size() for t in weights)
        if need > 0.9 * hugepages.available_bytes():
            log.warning("weights (%.1f GiB) do not fit in available memory: left memory-mapped",
                        need / 2**30)
            return False
        files = hugepages.file_mappings()
        for module in self.modules():
            for p in module.parameters(recurse=False):
                p.data = hugepages.to_hugepages(p.data, files)
            for name, b in list(module.named_buffers(recurse=False)):
                module._buffers[name] = hugepages.to_hugepages(b, files)
        for module, name, w in q8:
            setattr(module, name, Q8Weight(hugepages.to_hugepages(w.q, files),
                                           hugepages.to_hugepages(w.scale, files)))
        return True

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return KVCache(self.cfg, batch, capacity, self.dtype, self.device)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, start: int = 0,
                cache: KVCache | None = None) -> torch.Tensor:
        """ids [B, T] at positions start..start+T-1 -> final-normed hidden [B, T, H].

        With a cache, its positions before `start` must hold this batch's earlier tokens; the
        new keys and values are written into it and its length becomes start + T.
        """
        b, t = ids.shape
        if start + t > self.cfg.max_position_embeddings:
            raise ValueError(f"positions up to {start + t} exceed the model's context of "
                             f"{self.cfg.max_position_embeddings} tokens")
        if cache is not None and start + t > cache.capacity:
            raise ValueError(f"KV cache holds {cache.capacity} positions; {start + t} needed")
        pos = torch.arange(start, start + t, device=self.device).repeat(b)  # [B*T]
        attn = ContiguousAttention(self.cfg, b, t, start, cache)
        hidden = self.forward_flat(ids.reshape(-1), pos, attn)
        if cache is not None:
            cache.length = start + t
        return hidden.view(b, t, -1)

    @torch.inference_mode()
    def forward_flat(self, ids: torch.Tensor, positions: torch.Tensor,
                     attn: AttentionBackend, lora: LoraBatch | None = None) -> torch.Tensor:
        """ids [N], positions [N] (any mix of sequences; `attn` knows which is which)
        -> final-normed hidden [N, H]. `lora`: which rows use which LoRA adapter."""
        x = F.embedding(ids.to(self.device), self.embed)  # [N, H]
        cos, sin = self.rope.cos_sin(positions.to(self.device))  # [N, D/2]
        for block in self.blocks:
            x = block(x, cos, sin, attn, lora)
        return rms_norm(x, self.norm, self.cfg.rms_norm_eps)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> logits [..., V] float32."""
        return linear(hidden, self.unembed, out_dtype=torch.float32)


DENSE_DTYPES = ("bfloat16", "int8")


def load_model(path: str | Path, dtype: str | torch.dtype = "bfloat16",
               device: str = "cpu", layout: str | None = None,
               progress: bool | None = None, dense_dtype: str = "bfloat16") -> GptOss:
    """Reads, validates and builds a model from a checkpoint folder (either layout).
    `dense_dtype="int8"` keeps the attention projections and the unembedding in 8 bits
    (`GptOss.quantize_dense`)."""
    if dense_dtype not in DENSE_DTYPES:
        raise ValueError(f"unknown dense dtype {dense_dtype!r}; choose from {DENSE_DTYPES}")
    if isinstance(dtype, str):
        if dtype == "auto":
            dtype = "bfloat16"
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose from {sorted(DTYPES)} or auto")
        dtype = DTYPES[dtype]
    ckpt = read_checkpoint(path, layout, progress=progress)  # type: ignore[arg-type]
    model = GptOss.from_checkpoint(ckpt, dtype, device)
    if dense_dtype == "int8":
        model.quantize_dense()
    model.to_hugepages()
    return model
