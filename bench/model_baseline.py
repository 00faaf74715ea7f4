"""Baseline of the plain model path: load time, memory, prefill and decode speed, as JSON.

    python bench/model_baseline.py --model DIR [--dtype bfloat16] [--prompt-tokens 128]
        [--decode-tokens 16] [--threads 2]

Prompt tokens are random ids (speed does not depend on the text); decoding is greedy with the
single-sequence KV cache of `ossrt.engine.generate`. Memory comes from /proc/self/status:
RssAnon is memory the process owns, RssFile the memory-mapped checkpoint pages it touched.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time

import torch

from ossrt.engine import SamplingParams, generate
from ossrt.model import load_model


def rss_gib() -> dict[str, float]:
    out = {}
    for line in open("/proc/self/status"):
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = round(int(rest.split()[0]) / (1 << 20), 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    model = load_model(args.model, args.dtype, progress=False)
    load_s = time.perf_counter() - t0
    mem_loaded = rss_gib()

    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, 200000, (args.prompt_tokens,), generator=g).tolist()
    res = generate(model, prompt, SamplingParams(temperature=0, max_tokens=args.decode_tokens))
    decoded = len(res.token_ids) - 1  # the first token comes from the prefill's logits
    print(json.dumps({
        "model": args.model,
        "dtype": args.dtype,
        "threads": args.threads,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "load_seconds": round(load_s, 2),
        "memory_gib_after_load": mem_loaded,
        "prompt_tokens": args.prompt_tokens,
        "prefill_seconds": round(res.prefill_seconds, 2),
        "prefill_tok_s": round(args.prompt_tokens / res.prefill_seconds, 2),
        "decode_tokens": decoded,
        "decode_tok_s": round(decoded / res.decode_seconds, 3) if decoded > 0 else None,
        "memory_gib_end": rss_gib(),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20), 2),
    }, indent=2))


if __name__ == "__main__":
    main()
