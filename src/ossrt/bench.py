"""`ossrt bench`: engine speed on any checkpoint, as one JSON object.

Measures, with random prompt ids (speed does not depend on the text):
- load time of the model;
- prefill: one request of `prompt_tokens`, time to its first token (TTFT) and prefill tok/s,
  after one untimed request of the same size (first-touch costs: thread pools, allocator, caches;
  llama.cpp's benchmarks warm up the same way);
- decode at each concurrency c: c sequences decoding together, aggregate and per-sequence tok/s
  (timed from the step after every sequence has its first token), and its bandwidth bound: the
  bytes a step reads (`membw.step_bytes`) over the machine's read rate (`membw.read_bandwidth`,
  the median of the rates measured before loading the model and after the decode runs), as
  the fastest possible aggregate tok/s and the fraction of it reached;
- peak RSS of the process (taken before the second read-rate probe, whose buffer it would
  otherwise count).
"""

from __future__ import annotations

import resource
import time
from typing import Any

import torch

from .engine.llm_engine import EngineConfig, LLMEngine
from .engine.malloc import fix_mmap_threshold
from .engine.sequence import SamplingParams
from .model import kernels, load_model
from .model.membw import read_bandwidth, step_bytes, summary


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 200000, (n,), generator=g).tolist()


def _prefill(engine: LLMEngine, n: int, seed: int = 1) -> dict[str, float]:
    engine.add_request(f"prefill-{seed}", _prompt(n, seed),
                       SamplingParams(temperature=0, max_tokens=1))
    t0 = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    dt = time.perf_counter() - t0
    return {"prompt_tokens": n, "ttft_s": round(dt, 3), "prefill_tok_s": round(n / dt, 2)}


def _decode(engine: LLMEngine, conc: int, prompt_tokens: int, tokens: int) -> dict[str, float]:
    params = SamplingParams(temperature=0, max_tokens=tokens + 1)
    for i in range(conc):
        engine.add_request(f"dec-{conc}-{i}", _prompt(prompt_tokens, 100 + i), params)
    produced: dict[str, int] = {}
    while len(produced) < conc or min(produced.values()) < 1:  # prefill everything first
        for o in engine.step():
            produced[o.request_id] = o.num_output_tokens
    t0 = time.perf_counter()
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    dt = time.perf_counter() - t0
    total = conc * tokens
    return {"concurrency": conc, "decode_steps": steps,
            "decode_tok_s_aggregate": round(total / dt, 3),
            "decode_tok_s_per_seq": round(tokens / dt, 3)}


def run_bench(model_dir: str, *, dtype: str = "auto", prompt_tokens: int = 512,
              decode_tokens: int = 32, decode_prompt_tokens: int = 128,
              concurrency: tuple[int, ...] = (1, 4, 8), threads: int | None = None,
              kv_cache_gb: float = 2.0, dense_dtype: str = "bfloat16") -> dict[str, Any]:
    if threads:
        torch.set_num_threads(threads)
    fix_mmap_threshold()  # as `ossrt serve` runs
    before = read_bandwidth() if kernels.available() else []  # the read loop is native
    t0 = time.perf_counter()
    model = load_model(model_dir, dtype, progress=False, dense_dtype=dense_dtype)
    load_s = time.perf_counter() - t0
    engine = LLMEngine(model, EngineConfig(max_num_seqs=max(concurrency),
                                           max_num_batched_tokens=max(prompt_tokens, 256),
                                           kv_cache_bytes=int(kv_cache_gb * (1 << 30)),
                                           enable_prefix_caching=False))
    _prefill(engine, prompt_tokens, seed=2)  # warm-up, untimed
    prefill = _prefill(engine, prompt_tokens)
    result: dict[str, Any] = {
        "model": model_dir, "dtype": str(model.dtype).removeprefix("torch."),
        "dense_dtype": model.dense_dtype,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "load_s": round(load_s, 2), "prefill": prefill,
        "decode": [_decode(engine, c, decode_prompt_tokens, decode_tokens) for c in concurrency],
    }
    result["peak_rss_gib"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20), 2)
    if before:
        rates = before + read_bandwidth()
        result["read_gb_s"] = {"before": summary(before), "after": summary(rates[len(before):])}
        bw = summary(rates)["median"]
        for d in result["decode"]:
            b = step_bytes(model.cfg, d["concurrency"], decode_prompt_tokens, model.dense_dtype)
            bound = d["concurrency"] / (b.total / (bw * 1e9))
            d.update(bytes_per_step_gb=round(b.total / 1e9, 3),
                     bound_tok_s=round(bound, 2),
                     of_bound=round(d["decode_tok_s_aggregate"] / bound, 3))
    return result
