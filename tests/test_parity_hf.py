"""Logits parity with transformers' `GptOssForCausalLM`, the reference nobody here wrote.

Both models read the same random checkpoint folder (ossrt's writer, Hugging Face layout). The
reference dequantizes the MXFP4 experts (exact, SPEC.md 3) and runs eager attention with sinks
and sliding windows. What is proven here:

- fp32 logits agree within 1e-4 on `tiny` and on two other shapes (GQA 4:1 and MQA, top-1 and
  top-4 routing, hidden 96 and 32, intermediate != hidden, head dims 24 and 8, windows of 8,
  layer types that do not alternate), over sequences several windows long, and at positions
  past YaRN's original context of 4,096;
- greedy continuations of 32 tokens are the same token ids;
- bf16 argmax agrees wherever the decision is not a numerical near-tie (see the bf16 test);
- decoding through ossrt's KV cache, one token at a time or in chunks, reproduces one full pass.

Measured on the 2-core CPU this was written on (transformers 5.24, torch 2.13, checkpoint
seeds 0-5 and 7): fp32 max abs diff 1.5e-5 .. 3.8e-5 against logits of magnitude ~20; HF's
*own* cached decode differs from its full pass by up to 5.7e-5, the fp32 noise floor of these
random models.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from ossrt.engine import SamplingParams, generate
from ossrt.model import load_model, preset, write_checkpoint
from ossrt.model.config import FULL, SLIDING, GptOssConfig, alternating_layer_types
from ossrt.model.model import GptOss

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # Mxfp4Config's dequantizing loader needs it

FP32_ATOL = 1e-4  # logits; fp32 noise floor of these models is ~5e-5 (see module docstring)
HIDDEN_ATOL = 2e-5  # final-normed hidden states (O(1) values); measured max 1.2e-5

_TINY = preset("tiny")
# vocab 4096 keeps the small shapes fast; eos/pad must be inside the vocabulary for HF's
# nn.Embedding(padding_idx=...).
_SMALL_VOCAB = dict(vocab_size=4096, eos_token_id=4095, pad_token_id=4094)
CONFIGS: dict[str, GptOssConfig] = {
    # vocab 201088, 4 layers alternating, 4 q / 2 kv heads, 8 experts top-2, window 16
    "tiny": _TINY,
    # GQA 4:1, head dim 24, 16 experts top-1, intermediate > hidden, window 8, full layer first
    "gqa4-top1": _TINY.replace(hidden_size=96, intermediate_size=160, head_dim=24,
                               num_attention_heads=8, num_key_value_heads=2,
                               num_local_experts=16, num_experts_per_tok=1, sliding_window=8,
                               num_hidden_layers=3, layer_types=(FULL, SLIDING, SLIDING),
                               **_SMALL_VOCAB),
    # MQA (6 q heads, 1 kv head), head dim 8, 5 experts top-4, hidden 32 < intermediate 96
    "mqa-top4": _TINY.replace(hidden_size=32, intermediate_size=96, head_dim=8,
                              num_attention_heads=6, num_key_value_heads=1,
                              num_local_experts=5, num_experts_per_tok=4, sliding_window=8,
                              num_hidden_layers=3, layer_types=(SLIDING, SLIDING, FULL),
                              **_SMALL_VOCAB),
}
SEQ_LEN = {"tiny": 80, "gqa4-top1": 40, "mqa-top4": 40}  # each 5 windows long


class Zoo:
    """Writes each checkpoint once (both layouts, same seed) and loads each model once."""

    def __init__(self, root: Path, seed: int = 7) -> None:
        self.root, self.seed = root, seed
        self._dirs: dict[str, Path] = {}
        self._ours: dict[tuple[str, str, str], GptOss] = {}
        self._hf: dict[tuple[str, torch.dtype], torch.nn.Module] = {}

    def checkpoint(self, name: str) -> Path:
        if name not in self._dirs:
            cfg = CONFIGS[name]
            out = self.root / name
            write_checkpoint(cfg, out, layout="hf", seed=self.seed)
            if cfg.layer_types == alternating_layer_types(cfg.num_hidden_layers):
                write_checkpoint(cfg, out, layout="original", seed=self.seed)
            self._dirs[name] = out
        return self._dirs[name]

    def ours(self, name: str, dtype: str = "float32", layout: str = "hf") -> GptOss:
        key = (name, dtype, layout)
        if key not in self._ours:
            self._ours[key] = load_model(self.checkpoint(name), dtype, layout=layout)
        return self._ours[key]

    def hf(self, name: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        key = (name, dtype)
        if key not in self._hf:
            model = transformers.GptOssForCausalLM.from_pretrained(
                self.checkpoint(name),
                quantization_config=transformers.Mxfp4Config(dequantize=True),
                dtype=dtype, attn_implementation="eager").eval()
            # No eos/pad: a None passed to generate() would be refilled from the model's
            # generation config, and HF would stop early on (or be barred from) eos.
            model.generation_config = transformers.GenerationConfig()
            self._hf[key] = model
        return self._hf[key]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zoo]:
    yield Zoo(tmp_path_factory.mktemp("parity_hf"))


def _ids(cfg: GptOssConfig, batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, length),
                         generator=torch.Generator().manual_seed(seed))


def _ours_logits(model: GptOss, ids: torch.Tensor) -> torch.Tensor:
    return model.logits(model(ids))


@torch.no_grad()
def _hf_logits(model: torch.nn.Module, ids: torch.Tensor,
               keep: torch.Tensor | int = 0) -> torch.Tensor:
    return model(ids, logits_to_keep=keep).logits.float()


# ---- 1. fp32 logits ------------------------------------------------------------------------

@pytest.mark.parametrize("name,layout", [("tiny", "hf"), ("tiny", "original"),
                                         ("gqa4-top1", "hf"), ("mqa-top4", "hf")])
def test_fp32_logits_match_hf(zoo: Zoo, name: str, layout: str) -> None:
    """fp32 logits equal the reference's within 1e-4 at every position of two sequences five
    sliding windows long (both checkpoint layouts for ossrt; HF reads the HF layout)."""
    cfg = CONFIGS[name]
    assert SEQ_LEN[name] >= 5 * cfg.sliding_window
    ids = _ids(cfg, 2, SEQ_LEN[name], seed=1)
    ours = _ours_logits(zoo.ours(name, layout=layout), ids)
    ref = _hf_logits(zoo.hf(name), ids)
    assert ours.shape == ref.shape == (2, SEQ_LEN[name], cfg.vocab_size)
    assert ref.std() > 1.0  # logits carry real signal, so a small diff is meaningful
    diff = (ours - ref).abs().max().item()
    print(f"{name}/{layout}: fp32 max abs diff {diff:.2e} (max |logit| {ref.abs().max():.1f})")
    assert diff <= FP32_ATOL


# ---- 2. past YaRN's original context ---------------------------------------------------------

LONG = 4200
LONG_POSITIONS = [0, 1, 15, 16, 17, 100, 2048, 4095, 4096, 4097, 4150, LONG - 1]


def test_fp32_logits_match_hf_past_original_context(zoo: Zoo) -> None:
    """On a 4,200-token sequence, fp32 logits agree within 1e-4 at positions before and after
    4,096 (YaRN's original context); long enough for ossrt's attention to chunk its queries."""
    cfg = CONFIGS["tiny"]
    assert LONG > cfg.original_max_position_embeddings
    ids = _ids(cfg, 1, LONG, seed=2)
    pos = torch.tensor(LONG_POSITIONS)
    model = zoo.ours("tiny")
    ours = model.logits(model(ids)[0, pos])
    ref = _hf_logits(zoo.hf("tiny"), ids, keep=pos)[0]
    assert ref.shape == ours.shape == (len(LONG_POSITIONS), cfg.vocab_size)
    per_pos = (ours - ref).abs().amax(-1)
    print("past 4096: max abs diff per position",
          {p: f"{d:.1e}" for p, d in zip(LONG_POSITIONS, per_pos.tolist())})
    assert per_pos.max().item() <= FP32_ATOL


# ---- 3. greedy continuations -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny", "mqa-top4"])
def test_greedy_continuation_matches_hf(zoo: Zoo, name: str) -> None:
    """ossrt's generate() at temperature 0 emits the same 32 tokens as HF generate(do_sample=
    False), for three prompts; prompt + continuation runs well past the sliding window."""
    cfg = CONFIGS[name]
    model, ref = zoo.ours(name), zoo.hf(name)
    for seed in range(3):
        prompt = _ids(cfg, 1, 12, seed=100 + seed)
        ours = generate(model, prompt[0].tolist(), SamplingParams(temperature=0, max_tokens=32))
        with torch.no_grad():
            out = ref.generate(prompt, attention_mask=torch.ones_like(prompt),
                               do_sample=False, max_new_tokens=32)
        theirs = out[0, prompt.shape[1]:].tolist()
        assert len(theirs) == 32 and ours.finish_reason == "length"
        assert len(set(theirs)) > 1  # not a degenerate single-token loop
        assert ours.token_ids == theirs, f"prompt seed {100 + seed}"


# ---- 4. bfloat16 ---------------------------------------------------------------------------------

# A position is "decisive" when bf16 rounding should not flip the fp32 reference's decisions
# there: its top-1 logit leads the runner-up by >= LOGIT_MARGIN (~3x the median per-position
# bf16 logit error, 0.3-0.4 on tiny), and at every layer the router's k-th expert leads the
# (k+1)-th by >= ROUTER_GAP (several times the bf16 rounding step of router logits near 1-2,
# 0.008-0.016).
LOGIT_MARGIN = 1.0
ROUTER_GAP = 0.1


@dataclass
class Bf16Stats:
    """Per-position argmax ids [N] of the three runs, the decisive mask, and per-position max
    abs logit error [N] of each bf16 run against HF fp32."""

    ours16: list[torch.Tensor] = field(default_factory=list)
    hf16: list[torch.Tensor] = field(default_factory=list)
    hf32: list[torch.Tensor] = field(default_factory=list)
    decisive: list[torch.Tensor] = field(default_factory=list)
    err_ours16: list[torch.Tensor] = field(default_factory=list)
    err_hf16: list[torch.Tensor] = field(default_factory=list)

    def agree(self, a: str, b: str, decisive_only: bool = False) -> float:
        same = torch.cat(getattr(self, a)) == torch.cat(getattr(self, b))
        return (same[torch.cat(self.decisive)] if decisive_only else same).float().mean().item()

    def median_err(self, run: str) -> float:
        return torch.cat(getattr(self, f"err_{run}")).median().item()


@torch.no_grad()
def bf16_stats(zoo: Zoo, name: str, batches: int, seed: int) -> Bf16Stats:
    """Runs `batches` batches of 8 x 64 random tokens through ossrt bf16, HF bf16 and HF fp32."""
    cfg, k = CONFIGS[name], CONFIGS[name].num_experts_per_tok
    stats = Bf16Stats()
    for i in range(batches):
        ids = _ids(cfg, 8, 64, seed=seed + i)
        ours16 = _ours_logits(zoo.ours(name, "bfloat16"), ids).flatten(0, 1)  # [N, V]
        hf16 = _hf_logits(zoo.hf(name, torch.bfloat16), ids).flatten(0, 1)  # [N, V]
        out32 = zoo.hf(name)(ids, output_router_logits=True)
        hf32 = out32.logits.float().flatten(0, 1)  # [N, V]
        ranked = [r.float().sort(-1, descending=True).values for r in out32.router_logits]
        router_gap = torch.stack([r[:, k - 1] - r[:, k] for r in ranked]).amin(0)  # [N]
        top2 = hf32.topk(2, dim=-1).values  # [N, 2]
        stats.decisive.append((top2[:, 0] - top2[:, 1] >= LOGIT_MARGIN)
                              & (router_gap >= ROUTER_GAP))
        for run, logits in (("ours16", ours16), ("hf16", hf16), ("hf32", hf32)):
            getattr(stats, run).append(logits.argmax(-1))
        stats.err_ours16.append((ours16 - hf32).abs().amax(-1))
        stats.err_hf16.append((hf16 - hf32).abs().amax(-1))
    return stats


@pytest.mark.parametrize("name,batches", [("tiny", 4), ("gqa4-top1", 2)])
def test_bf16_argmax_matches_hf(zoo: Zoo, name: str, batches: int) -> None:
    """bf16 next-token argmax agrees with HF bf16 (and with HF fp32) on >= 99% of decisive
    positions, and ossrt's bf16 is as faithful to the fp32 reference as HF's own bf16.

    99% over *all* positions is out of reach on random weights, for either implementation:
    on tiny (7 checkpoint seeds x 2,048 positions) HF bf16 matches HF fp32 on only 87-91% of
    positions, and ossrt bf16 matches HF bf16 on 87-91%. Two causes, both rounding: (1) random
    201088-way logits have small top-1 margins (10% of positions lead by < 0.06) while bf16
    logits near 20 round in steps of 0.125 and carry ~0.35 error; (2) near-tied router logits
    flip a top-k expert choice in bf16 on ~8% of tokens, which moves those tokens' logits by
    O(10) and, through attention, disturbs later tokens. On decisive positions (~13% of tiny's,
    ~23% of gqa4-top1's) ossrt~HF bf16 measured 0.996-1.0 and ossrt~HF fp32 1.0; the rare miss
    is an expert flip inherited through attention from an earlier, non-decisive token. Hence
    2,048 positions for tiny: one such miss must not decide the test.
    """
    stats = bf16_stats(zoo, name, batches, seed=3)
    decisive_count = int(torch.cat(stats.decisive).sum())
    pairs = (("ours16", "hf16"), ("ours16", "hf32"), ("hf16", "hf32"))
    rates = {f"{a}~{b}": round(stats.agree(a, b), 4) for a, b in pairs}
    decisive = {f"{a}~{b}": round(stats.agree(a, b, decisive_only=True), 4) for a, b in pairs}
    print(f"{name} bf16 argmax agreement over {batches * 512} positions: {rates}; over the "
          f"{decisive_count} decisive: {decisive}; median logit error vs fp32: ours "
          f"{stats.median_err('ours16'):.3f}, hf {stats.median_err('hf16'):.3f}")

    assert decisive_count >= 100  # the decisive subset is a real sample
    assert decisive["ours16~hf16"] >= 0.99
    assert decisive["ours16~hf32"] >= 0.99
    # Overall: measured ours16~hf16 0.87-0.91 (tiny) and 0.92-0.95 (gqa4-top1); below 0.75
    # more than rounding would be at play.
    assert rates["ours16~hf16"] >= 0.75
    # ossrt's bf16 is no further from fp32 than the reference's bf16 is: the difference was
    # -0.01 .. +0.024 over 7 checkpoint seeds; 0.03 is ~3 standard errors of it.
    assert rates["ours16~hf32"] >= rates["hf16~hf32"] - 0.03
    # The same as a continuous measure: ossrt's median per-position logit error against fp32 is
    # no larger than HF bf16's (measured ratio 0.82-0.94 over 7 checkpoint seeds: ossrt keeps
    # RoPE in fp32, HF casts cos/sin to bf16). Sensitivity check: RMSNorm in bf16 gives 1.10.
    assert stats.median_err("ours16") <= stats.median_err("hf16")


# ---- 5. KV cache ---------------------------------------------------------------------------------

def _cached_pass(model: GptOss, ids: torch.Tensor, prefill: int, step: int) -> torch.Tensor:
    """Final-normed hidden states [B, T, H] from a prefill of `prefill` tokens, then chunks of
    `step` tokens, each at `start=cache.length`."""
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    parts = [model(ids[:, :prefill], 0, cache)] if prefill else []
    for s in range(prefill, ids.shape[1], step):
        assert cache.length == s
        parts.append(model(ids[:, s:s + step], cache.length, cache))
    assert cache.length == ids.shape[1]
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("prefill,step", [(5, 1), (0, 7), (0, 20)],
                         ids=["prefill5-decode1", "chunks7", "chunks20"])
def test_kv_cache_matches_full_forward(zoo: Zoo, name: str, prefill: int, step: int) -> None:
    """fp32: a short prefill then one token at a time, or chunked prefill (7 tokens: < every
    window; 20: > every window), reproduces one full pass (hidden states within 2e-5, logits
    within 1e-4) at every position, for a batch of two, far past the sliding window.

    Tolerance: 1e-5 on logits of magnitude ~20 is below the fp32 noise floor (matrix products of
    1 vs T rows sum in different orders, and these random models amplify it): HF's own cached
    decode differs from its full pass by up to 5.7e-5 on tiny. ossrt's, over 7 checkpoint
    seeds: logits up to 6.5e-5, hidden states up to 1.2e-5 (tiny), 6.8e-6 (other shapes).
    """
    cfg = CONFIGS[name]
    model = zoo.ours(name)
    ids = _ids(cfg, 2, SEQ_LEN[name], seed=4)
    assert ids.shape[1] >= 5 * cfg.sliding_window
    full = model(ids)
    cached = _cached_pass(model, ids, prefill, step)
    hidden_diff = (cached - full).abs().max().item()
    logits = model.logits(cached)
    logit_diff = (logits - model.logits(full)).abs().max().item()
    hf_diff = (logits - _hf_logits(zoo.hf(name), ids)).abs().max().item()
    print(f"{name} prefill={prefill} step={step}: hidden {hidden_diff:.1e}, logits "
          f"{logit_diff:.1e}, vs HF {hf_diff:.1e}")
    assert hidden_diff <= HIDDEN_ATOL
    assert logit_diff <= FP32_ATOL
    assert hf_diff <= 2 * FP32_ATOL  # the triangle bound: cached~full plus full~HF
