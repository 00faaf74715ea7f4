"""The bandwidth bound of CPU decode: bytes a step must read, and how fast this machine reads.

Decode on a CPU is bound by memory reads: every step streams each weight it touches once
(attention projections and the unembedding in full, the MXFP4 experts its tokens route to) plus
the KV cache it attends over. `step_bytes` counts those bytes for a step of B sequences;
`read_bandwidth` measures the machine's read rate with a plain parallel loop over huge pages,
the way the kernels read. bytes / rate is the fastest a step can be; a benchmark states how
close it comes (`ossrt bench`, `bench/vs_llamacpp.py`).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from . import hugepages, kernels
from .config import GptOssConfig

MXFP4_BYTES = 17 / 32  # per expert weight: 16 bytes of nibbles + 1 scale byte per 32 values
DENSE_BYTES = {"bfloat16": 2.0, "int8": 1 + 4 / 32, "q8_0": 34 / 32}  # per dense weight


@dataclass(frozen=True)
class StepBytes:
    """Bytes one decode step reads, by kind (all fields in bytes)."""

    dense: float  # q, k, v, o of every layer, the unembedding, the routers (bf16)
    experts: float  # the distinct experts the step's tokens route to, every layer
    kv: float  # keys and values attended over

    @property
    def total(self) -> float:
        return self.dense + self.experts + self.kv


def expected_experts(num_experts: int, top_k: int, batch: int) -> float:
    """Distinct experts B tokens route to, each picking top_k of num_experts uniformly (random
    weights route close to that; a trained router concentrates more, so fewer):
    E (1 - (1 - k/E)^B)."""
    return num_experts * (1 - (1 - top_k / num_experts) ** batch)


def step_bytes(cfg: GptOssConfig, batch: int, depth: int, dense: str = "bfloat16") -> StepBytes:
    """A decode step of `batch` sequences, each with `depth` tokens of context, `dense` the
    attention/unembedding weight format (bfloat16, int8 = ours, q8_0 = llama.cpp's)."""
    if dense not in DENSE_BYTES:
        raise ValueError(f"dense must be one of {sorted(DENSE_BYTES)}, got {dense!r}")
    if batch < 1 or depth < 0:
        raise ValueError("batch must be >= 1 and depth >= 0")
    h, layers = cfg.hidden_size, cfg.num_hidden_layers
    attn = 2 * h * cfg.q_dim + 2 * h * cfg.kv_dim  # q and o; k and v
    dense_b = ((layers * attn + cfg.vocab_size * h) * DENSE_BYTES[dense]
               + layers * cfg.num_local_experts * h * 2)
    expert = (2 * cfg.intermediate_size * h + h * cfg.intermediate_size) * MXFP4_BYTES
    used = expected_experts(cfg.num_local_experts, cfg.num_experts_per_tok, batch)
    kv_row = 2 * cfg.kv_dim * 2  # keys and values of one position, bf16
    seen = sum(depth if cfg.window(n) is None else min(depth, cfg.window(n))
               for n in range(layers))
    return StepBytes(dense=dense_b, experts=layers * used * expert,
                     kv=batch * seen * kv_row)


def read_bandwidth(nbytes: int = 1 << 30, reps: int = 5) -> list[float]:
    """GB/s (1e9 bytes) of `reps` parallel reads of an nbytes buffer in huge pages, over torch's
    threads, after one untimed pass. Needs the native kernels."""
    if not kernels.available():
        raise RuntimeError("the native kernels are not available")
    buf = hugepages.empty((nbytes // 8,), torch.int64)
    buf.fill_(0x0123456789ABCDEF)  # touch every page: reads then find resident memory
    kernels.read_xor(buf)
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        kernels.read_xor(buf)
        out.append(buf.numel() * 8 / (time.perf_counter() - t) / 1e9)
    del buf
    return out


def summary(rates: list[float]) -> dict[str, float]:
    """Median, lowest and highest of `read_bandwidth`'s rates, rounded (GB/s)."""
    return {"median": round(statistics.median(rates), 1), "min": round(min(rates), 1),
            "max": round(max(rates), 1)}
