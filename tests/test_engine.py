"""The batched engine on a real (tiny, float32) model: batch invariance under prefill, preemption
and aborts; prefix reuse; seeds; context limits; long context; the asyncio front."""

from __future__ import annotations

import asyncio
import math
from dataclasses import replace

import pytest
import torch

from ossrt.engine import ContextLengthExceeded, QueueFull, SamplingParams, generate
from ossrt.engine.async_engine import AsyncEngine
from ossrt.engine.kv_cache import KVCacheManager
from ossrt.engine.llm_engine import EngineConfig, LLMEngine, StepOutput, kv_cache_spec
from ossrt.engine.paged_attention import PagedKVStorage
from ossrt.model import GptOss, load_model, preset, write_checkpoint
from ossrt.model.config import FULL, SLIDING

GREEDY = SamplingParams(temperature=0, max_tokens=8, logprobs=2)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> GptOss:
    # The tiny preset with a small vocabulary: every feature, fast logits.
    cfg = preset("tiny").replace(vocab_size=4096)
    out = tmp_path_factory.mktemp("engine-ckpt")
    write_checkpoint(cfg, out, seed=11)
    return load_model(out, "float32", progress=False)


def prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 90) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(0, 4096, (k,), generator=g).tolist() for k in lens]


def run_all(engine: LLMEngine, reqs: dict[str, tuple[list[int], SamplingParams]],
            abort_at: dict[str, int] | None = None) -> dict[str, list[StepOutput]]:
    """Adds all requests, steps to the end; aborts request r after `abort_at[r]` steps."""
    out: dict[str, list[StepOutput]] = {r: [] for r in reqs}
    for r, (p, sp) in reqs.items():
        engine.add_request(r, p, sp)
    step = 0
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id].append(o)
        step += 1
        for r, at in (abort_at or {}).items():
            if at == step:
                engine.abort(r)
    return out


def tokens(outs: list[StepOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def logprobs(outs: list[StepOutput]) -> list[float]:
    return [lp.logprob for o in outs for lp in o.logprobs]


def alone(model: GptOss, prompt: list[int], params: SamplingParams) -> list[StepOutput]:
    engine = LLMEngine(model, EngineConfig(kv_cache_bytes=8 << 20, enable_prefix_caching=False))
    return run_all(engine, {"x": (prompt, params)})["x"]


def test_batch_invariance_with_chunked_prefill_preemption_and_aborts(model):
    """16 concurrent requests of different lengths, a KV pool small enough to force
    preemptions, small prefill chunks, and two aborts: each surviving request gives the same
    greedy tokens and logprobs as alone."""
    ps = prompts(16, seed=1)
    reqs = {f"r{i}": (p, GREEDY) for i, p in enumerate(ps)}
    base = EngineConfig(block_size=8, max_num_seqs=16, max_num_batched_tokens=48,
                        kv_cache_bytes=1 << 30, enable_prefix_caching=False)
    sliding_blocks = kv_cache_spec(model, base).num_blocks_sliding
    per_full = PagedKVStorage.bytes_per_block(model.cfg, FULL, 8, model.dtype)
    per_sliding = PagedKVStorage.bytes_per_block(model.cfg, SLIDING, 8, model.dtype)
    # A full pool of 36 blocks (288 tokens) for 16 requests needing ~870: preemption is certain.
    budget = sliding_blocks * per_sliding + 36 * per_full
    engine = LLMEngine(model, replace(base, kv_cache_bytes=budget))
    assert engine.spec.num_blocks_full == 36
    out = run_all(engine, reqs, abort_at={"r3": 2, "r9": 5})
    assert engine.num_preemptions > 0, "the pool was meant to force preemption"
    for r, (p, sp) in reqs.items():
        if r in ("r3", "r9"):
            assert len(tokens(out[r])) < sp.max_tokens
            continue
        ref = alone(model, p, sp)
        assert tokens(out[r]) == tokens(ref), r
        assert logprobs(out[r]) == pytest.approx(logprobs(ref), abs=1e-4), r
    assert engine.kv.usage() == 0.0  # everything freed


def test_engine_matches_single_sequence_path_and_model(model):
    """Greedy engine output equals the contiguous-cache `generate` path."""
    for p in prompts(3, seed=2):
        ref = generate(model, p, SamplingParams(temperature=0, max_tokens=10)).token_ids
        got = tokens(alone(model, p, SamplingParams(temperature=0, max_tokens=10)))
        assert got == ref


def test_prefix_reuse_computes_only_new_tokens(model):
    base = prompts(1, seed=3, lo=150, hi=151)[0]
    engine = LLMEngine(model, EngineConfig(block_size=16, kv_cache_bytes=16 << 20))
    run_all(engine, {"first": (base, GREEDY)})
    follow = base + [7, 8, 9, 10, 11]
    out = run_all(engine, {"second": (follow, GREEDY)})["second"]
    cached = out[-1].num_cached_tokens
    assert cached == (len(follow) - 1) // 16 * 16 >= 144
    assert tokens(out) == tokens(alone(model, follow, GREEDY))
    assert logprobs(out) == pytest.approx(logprobs(alone(model, follow, GREEDY)), abs=1e-4)


def test_n_choices_share_the_prompt(model):
    p = prompts(1, seed=4, lo=70, hi=71)[0]
    engine = LLMEngine(model, EngineConfig(block_size=16, kv_cache_bytes=16 << 20))
    params = SamplingParams(temperature=1.0, max_tokens=6, seed=5, n=3)
    out = run_all(engine, {"n": (p, params)})["n"]
    by_index = {i: [t for o in out if o.index == i for t in o.token_ids] for i in range(3)}
    assert all(len(v) == 6 for v in by_index.values())
    assert len({tuple(v) for v in by_index.values()}) > 1  # different streams per choice
    finals = {o.index: o for o in out if o.finished}
    assert finals[0].num_cached_tokens == 0
    assert finals[1].num_cached_tokens == finals[2].num_cached_tokens == 64


def test_seed_gives_same_tokens_alone_or_batched(model):
    p = prompts(1, seed=6)[0]
    params = SamplingParams(temperature=1.0, max_tokens=10, seed=1234)
    solo = tokens(alone(model, p, params))
    engine = LLMEngine(model, EngineConfig(kv_cache_bytes=16 << 20))
    others = {f"o{i}": (q, SamplingParams(temperature=1.0, max_tokens=7))
              for i, q in enumerate(prompts(5, seed=7))}
    out = run_all(engine, {"seeded": (p, params), **others})
    assert tokens(out["seeded"]) == solo
    assert tokens(alone(model, p, SamplingParams(temperature=1.0, max_tokens=10, seed=99))) != solo


def test_context_length_and_queue_limits_fail_before_work(model):
    engine = LLMEngine(model, EngineConfig(kv_cache_bytes=8 << 20, max_model_len=64,
                                           max_queue_len=2))
    with pytest.raises(ContextLengthExceeded, match="64"):
        engine.add_request("long", list(range(60)), SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request("bad", [1, 2, 99999], SamplingParams(max_tokens=1))
    engine.add_request("a", [1, 2], SamplingParams(max_tokens=1))
    engine.add_request("b", [1, 2], SamplingParams(max_tokens=1))
    with pytest.raises(QueueFull):
        engine.add_request("c", [1, 2], SamplingParams(max_tokens=1))
    assert engine.scheduler.num_waiting == 2


def test_abort_frees_blocks_at_once(model):
    engine = LLMEngine(model, EngineConfig(kv_cache_bytes=8 << 20))
    engine.add_request("a", prompts(1, seed=8, lo=80, hi=81)[0], SamplingParams(max_tokens=50))
    engine.step()
    assert engine.kv.usage() > 0
    engine.abort("a")
    assert engine.kv.usage() == 0.0 and not engine.has_unfinished()


def test_stop_tokens_end_the_sequence_and_are_not_emitted(model):
    p = prompts(1, seed=9)[0]
    free = tokens(alone(model, p, SamplingParams(temperature=0, max_tokens=8)))
    stop = free[3]
    out = alone(model, p, SamplingParams(temperature=0, max_tokens=8, stop_token_ids=(stop,)))
    assert tokens(out) == free[:free.index(stop)]
    assert out[-1].finish_reason == "stop"


@pytest.mark.slow
def test_long_prompt_32k(tmp_path_factory):
    """The tiny preset (131,072-token context) runs a 32,768-token prompt through the engine
    in chunks; the result matches one contiguous forward pass of the plain model."""
    cfg = preset("tiny").replace(vocab_size=1024)
    out = tmp_path_factory.mktemp("long-ckpt")
    write_checkpoint(cfg, out, seed=12)
    m = load_model(out, "float32", progress=False)
    p = torch.randint(0, 1024, (32768,), generator=torch.Generator().manual_seed(0)).tolist()
    engine = LLMEngine(m, EngineConfig(max_num_batched_tokens=4096, kv_cache_bytes=64 << 20))
    got = run_all(engine, {"long": (p, SamplingParams(temperature=0, max_tokens=2,
                                                       logprobs=0))})["long"]
    ref = generate(m, p, SamplingParams(temperature=0, max_tokens=2))
    assert tokens(got) == ref.token_ids


def test_kv_accounting_for_full_context_at_20b_shape():
    """One 131,072-token sequence at the 20b shape: full layers need the whole length, sliding
    layers only the window; the bf16 KV fits easily in this machine's 24 GiB."""
    cfg = preset("20b")
    bs = 16

    class _M:  # the shape of a model, without weights
        pass
    m = _M()
    m.cfg, m.dtype = cfg, torch.bfloat16
    spec = kv_cache_spec(m, EngineConfig(block_size=bs, max_num_seqs=1,
                                         max_num_batched_tokens=512, kv_cache_bytes=4 << 30))
    full, sliding = KVCacheManager.blocks_per_sequence(spec, 131072, chunk=1)
    assert full == 131072 // bs
    assert sliding <= math.ceil(cfg.sliding_window / bs) + 1
    per_full = PagedKVStorage.bytes_per_block(cfg, FULL, bs, torch.bfloat16)
    per_sliding = PagedKVStorage.bytes_per_block(cfg, SLIDING, bs, torch.bfloat16)
    total = full * per_full + sliding * per_sliding
    assert total == 131072 * 12 * 2 * 8 * 64 * 2 + sliding * per_sliding  # 3 GiB + a little
    assert total < 3.1 * (1 << 30)
    assert spec.num_blocks_full >= full  # the default-size budget holds a full-length sequence


def test_async_engine_streams_and_aborts_on_disconnect(model):
    async def main() -> None:
        engine = LLMEngine(model, EngineConfig(kv_cache_bytes=8 << 20))
        front = AsyncEngine(engine)
        try:
            p = prompts(1, seed=10)[0]
            got = [o async for o in front.generate(p, SamplingParams(temperature=0, max_tokens=5))]
            assert tokens(got) == tokens(alone(model, p, SamplingParams(temperature=0,
                                                                       max_tokens=5)))
            assert got[-1].finished
            # A client that leaves after one output: the request is aborted, blocks freed.
            stream = front.generate(p, SamplingParams(temperature=0, max_tokens=500))
            async for _ in stream:
                break
            await stream.aclose()
            for _ in range(100):
                if not engine.has_unfinished():
                    break
                await asyncio.sleep(0.02)
            assert not engine.has_unfinished() and engine.kv.usage() == 0.0
            with pytest.raises(ContextLengthExceeded):
                async for _ in front.generate([1] * 10, SamplingParams(max_tokens=10**6)):
                    pass
        finally:
            front.close()

    asyncio.run(main())


def test_chunked_prefill_in_bfloat16(tmp_path_factory):
    """A prompt longer than one step's token budget in bf16 (the served dtype): steps that only
    prefill sample nothing, and must not run the unembedding on zero rows (they killed the
    engine loop once: the native GEMV path was taken for 0 rows)."""
    out = tmp_path_factory.mktemp("bf16-ckpt")
    write_checkpoint(preset("tiny"), out, seed=13)
    m = load_model(out, "bfloat16", progress=False)
    p = torch.randint(0, 200_000, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    engine = LLMEngine(m, EngineConfig(max_num_batched_tokens=64, kv_cache_bytes=16 << 20))
    got = run_all(engine, {"long": (p, SamplingParams(temperature=0, max_tokens=3))})["long"]
    assert len(tokens(got)) == 3
