"""Serving LoRA adapters beside the base model: the engine's per-row adapters equal a model with
the adapter merged into its weights, in mixed batches, without sharing prefix-cache blocks."""

from __future__ import annotations

import copy

import pytest
import torch

from ossrt.engine.llm_engine import EngineConfig, LLMEngine
from ossrt.engine.sequence import SamplingParams
from ossrt.model import GptOss, load_model, preset, write_checkpoint
from ossrt.model.lora import LoraWeights

RANK, SCALE = 4, 2.0
MODULES = {"q_proj": "q_w", "k_proj": "k_w", "v_proj": "v_w", "o_proj": "o_w",
           "router": "router_w"}


@pytest.fixture(scope="module")
def model(tmp_path_factory, one_thread) -> GptOss:
    ckpt = tmp_path_factory.mktemp("lora-ckpt")
    write_checkpoint(preset("tiny"), ckpt, seed=11)
    return load_model(ckpt, "float32", progress=False)


def random_adapter(model: GptOss, seed: int, modules=tuple(MODULES)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer, block in enumerate(model.blocks):
        for module in modules:
            w = getattr(block, MODULES[module])
            out[f"layers.{layer}.{module}.lora_A"] = torch.randn(RANK, w.shape[1], generator=g) * .2
            out[f"layers.{layer}.{module}.lora_B"] = torch.randn(w.shape[0], RANK, generator=g) * .2
    return out


def merged(model: GptOss, tensors: dict[str, torch.Tensor]) -> GptOss:
    m = copy.deepcopy(model)
    for layer, block in enumerate(m.blocks):
        for module, attr in MODULES.items():
            a = tensors.get(f"layers.{layer}.{module}.lora_A")
            if a is not None:
                b = tensors[f"layers.{layer}.{module}.lora_B"]
                getattr(block, attr).data += SCALE * (b @ a)
    return m


def run(engine: LLMEngine, prompts: list[tuple[list[int], str | None]], tokens: int = 8):
    """Greedy tokens and logprobs of each (prompt, adapter), all in one batch."""
    for i, (p, adapter) in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=tokens,
                                                      logprobs=0, adapter=adapter))
    out: dict[str, list] = {f"r{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] += [(t.token, t.logprob) for t in o.logprobs]
    return [out[f"r{i}"] for i in range(len(prompts))]


def close(a, b) -> bool:
    return [t for t, _ in a] == [t for t, _ in b] and all(
        abs(x - y) < 1e-4 for (_, x), (_, y) in zip(a, b))


PROMPT = [200006, 1428, 200008, 13225, 11, 1495, 382, 261, 1746, 13, 200007, 200006]


def test_adapter_rows_equal_the_merged_model_in_a_mixed_batch(model: GptOss) -> None:
    ta, tb = random_adapter(model, 1), random_adapter(model, 2, ("q_proj", "v_proj"))
    engine = LLMEngine(model, EngineConfig(kv_cache_bytes=16 << 20))
    engine.add_adapter("a", LoraWeights.from_tensors(ta, SCALE, torch.float32))
    engine.add_adapter("b", LoraWeights.from_tensors(tb, SCALE, torch.float32))
    other = PROMPT[:5] + [1000, 2000, 3000]
    got = run(engine, [(PROMPT, "a"), (PROMPT, None), (other, "b"), (PROMPT, "b")])
    ref_a = run(LLMEngine(merged(model, ta), EngineConfig(kv_cache_bytes=16 << 20)),
                [(PROMPT, None)])[0]
    ref_b = run(LLMEngine(merged(model, tb), EngineConfig(kv_cache_bytes=16 << 20)),
                [(other, None), (PROMPT, None)])
    base = run(LLMEngine(model, EngineConfig(kv_cache_bytes=16 << 20)), [(PROMPT, None)])[0]
    assert close(got[0], ref_a) and close(got[1], base)
    assert close(got[2], ref_b[0]) and close(got[3], ref_b[1])
    assert not close(got[0], base)  # the adapter does change the output


def test_prefix_cache_is_not_shared_across_adapters(model: GptOss) -> None:
    ta = random_adapter(model, 3)
    engine = LLMEngine(model, EngineConfig(kv_cache_bytes=16 << 20, block_size=4))
    engine.add_adapter("a", LoraWeights.from_tensors(ta, SCALE, torch.float32))
    long = PROMPT * 3
    base_first = run(engine, [(long, None)])[0]  # fills the prefix cache with base KV
    with_a = run(engine, [(long, "a")])[0]  # must not reuse it
    ref = run(LLMEngine(merged(model, ta), EngineConfig(kv_cache_bytes=16 << 20)),
              [(long, None)])[0]
    assert close(with_a, ref) and not close(with_a, base_first)
    again = run(engine, [(long, "a")])[0]  # its own cached prefix is fine to reuse
    assert close(again, ref)


def test_bad_adapters_are_refused(model: GptOss) -> None:
    engine = LLMEngine(model, EngineConfig(kv_cache_bytes=16 << 20))
    with pytest.raises(ValueError, match="unknown LoRA adapter"):
        engine.add_request("x", PROMPT, SamplingParams(adapter="nope"))
    wrong = {"layers.0.q_proj.lora_A": torch.zeros(RANK, 7),
             "layers.0.q_proj.lora_B": torch.zeros(64, RANK)}
    with pytest.raises(ValueError, match="do not fit"):
        engine.add_adapter("w", LoraWeights.from_tensors(wrong, 1.0, torch.float32))
    with pytest.raises(ValueError, match="ossrt merge"):
        LoraWeights.from_tensors({"layers.0.gate_up_proj.lora_A": torch.zeros(1)}, 1.0,
                                 torch.float32)
