"""Where a decode step's time goes: the engine decoding C sequences at depth P, with each
native kernel call timed (wall clock, so the figures add up to the step), printed per step.

    .venv/bin/python bench/decode_profile.py --model /work/ckpt-20b --seqs 8 --depth 128

Weights in huge pages as `ossrt serve` has them. Not a benchmark of record (no peer, one
process): it tells which kernel to work on, and at what rate each one streams its weights.
Each layer runs op by op from Python (the engine's one-call-per-layer `decode_layer` is turned
off here, so that its inner kernels can be timed one by one).
"""

from __future__ import annotations

import argparse
import collections
import time
from typing import Any, Callable

import torch

from ossrt.bench import _prompt
from ossrt.engine.llm_engine import EngineConfig, LLMEngine
from ossrt.engine.paged_attention import PagedAttention
from ossrt.engine.malloc import fix_mmap_threshold
from ossrt.engine.sequence import SamplingParams
from ossrt.model import kernels, load_model

TIMED = ("moe_rows", "moe_token", "moe_decode", "bf16_linear", "bf16_linear_bf16", "q8_linear",
         "attn_decode", "rms_norm_bf16", "rope_bf16_", "mxfp4_linear")


def _timed(fn: Callable[..., Any], name: str, acc: dict[str, float],
           calls: collections.Counter[str]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        acc[name] += time.perf_counter() - t
        calls[name] += 1
        return out
    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="/work/ckpt-20b")
    ap.add_argument("--seqs", type=int, default=1)
    ap.add_argument("--depth", type=int, default=128, help="prompt tokens before decoding")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--dense-dtype", default="bfloat16", choices=("bfloat16", "int8"))
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    acc: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter[str] = collections.Counter()
    for name in TIMED:
        setattr(kernels, name, _timed(getattr(kernels, name), name, acc, calls))
    experts: list[int] = []  # distinct experts per batched MoE call (routed again, untimed)
    probe = [0.0]  # seconds spent routing again, left out of the step time
    timed_moe_decode = kernels.moe_decode
    def moe_decode(x: torch.Tensor, h: torch.Tensor, router_w: torch.Tensor,
                   router_b: torch.Tensor, top_k: int, *rest: Any) -> Any:
        if h.shape[0] > 1:
            t = time.perf_counter()
            logits = h.float() @ router_w.float().T + router_b.float()
            experts.append(int(logits.topk(top_k, -1).indices.unique().numel()))
            probe[0] += time.perf_counter() - t
        return timed_moe_decode(x, h, router_w, router_b, top_k, *rest)
    kernels.moe_decode = moe_decode
    PagedAttention.native_decode = lambda self, layer: None  # type: ignore[method-assign]
    torch.set_num_threads(a.threads)
    fix_mmap_threshold()
    model = load_model(a.model, "auto", progress=False, dense_dtype=a.dense_dtype)
    engine = LLMEngine(model, EngineConfig(
        max_num_seqs=a.seqs, max_num_batched_tokens=max(a.depth, 256),
        kv_cache_bytes=2 << 30, enable_prefix_caching=False))
    params = SamplingParams(temperature=0, max_tokens=a.steps + 8)
    for i in range(a.seqs):
        engine.add_request(f"r{i}", _prompt(a.depth, 100 + i), params)
    got: dict[str, int] = {}
    while len(got) < a.seqs or min(got.values()) < 1:  # every prompt prefilled
        for out in engine.step():
            got[out.request_id] = out.num_output_tokens
    for _ in range(3):
        engine.step()
    acc.clear()
    calls.clear()
    experts.clear()
    probe[0] = 0.0
    t0 = time.perf_counter()
    for _ in range(a.steps):
        engine.step()
    step = (time.perf_counter() - t0 - probe[0]) / a.steps
    print(f"{a.seqs} sequence(s) at depth {a.depth}: {step * 1e3:.1f} ms per step, "
          f"{a.seqs / step:.2f} tok/s aggregate")
    for name, total in sorted(acc.items(), key=lambda kv: -kv[1]):
        print(f"  {name:18s} {total / a.steps * 1e3:8.1f} ms/step  {calls[name] // a.steps} calls")
    print(f"  {'other':18s} {(step - sum(acc.values()) / a.steps) * 1e3:8.1f} ms/step")
    if experts:  # packed bytes of one expert: gate/up [2I, H] and down [H, I], 17 bytes per 32
        cfg = model.cfg
        per_expert = 3 * cfg.intermediate_size * cfg.hidden_size // 32 * 17
        mean = sum(experts) / len(experts)
        rate = sum(experts) * per_expert / acc["moe_decode"] / 1e9
        print(f"  moe_decode: {mean:.1f} experts per layer on average, streamed at {rate:.1f} GB/s"
              " (router and residual add included)")

if __name__ == "__main__":
    main()
