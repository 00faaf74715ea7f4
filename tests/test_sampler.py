"""The batched sampler: processing order, filters, logprobs, seeding and batch invariance (CPU)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from ossrt.engine.sampler import (
    SampledToken,
    apply_penalties_and_bias,
    make_generator,
    processed_logits,
    sample,
)
from ossrt.engine.sequence import SamplingParams


def logits_of(probs: list[float]) -> torch.Tensor:
    """A [V] float32 row of logits whose softmax is `probs`."""
    return torch.tensor(probs, dtype=torch.float64).log().to(torch.float32)


def draw_many(row: torch.Tensor, params: SamplingParams, n: int, seed: int = 0,
              history: list[int] | None = None, mask: torch.Tensor | None = None) -> Counter[int]:
    """n independent draws of one row: n batch rows, each with its own generator (seed, i)."""
    logits = row.expand(n, -1).contiguous()  # [n, V]
    gens = [make_generator(seed, i) for i in range(n)]
    out = sample(logits, [params] * n, [history or []] * n, gens,
                 None if mask is None else [mask] * n)
    return Counter(t.token for t in out)


def kept(row: torch.Tensor, params: SamplingParams) -> set[int]:
    """The token ids a single row can still be sampled from."""
    x = processed_logits(row[None], [params], [[]])[0]
    return set(torch.isfinite(x).nonzero().flatten().tolist())


# ---- greedy ------------------------------------------------------------------------------------

def test_greedy_picks_the_argmax_of_each_row_and_the_lowest_id_on_ties():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    logits[5, 7] = logits[5, 30] = logits[5].max() + 1.0  # a tie: 7 wins
    greedy = SamplingParams(temperature=0.0)
    out = sample(logits, [greedy] * 6, [[]] * 6, [make_generator(1, i) for i in range(6)])
    assert [t.token for t in out[:5]] == logits[:5].argmax(dim=-1).tolist()
    assert out[5].token == 7
    assert all(isinstance(t, SampledToken) and t.logprob is None and t.top_logprobs == ()
               for t in out)


def test_greedy_row_draws_nothing_from_its_generator():
    g = make_generator(3)
    before = g.get_state()
    sample(torch.randn(1, 20), [SamplingParams(temperature=0.0)], [[]], [g])
    assert torch.equal(g.get_state(), before)


def test_near_zero_temperature_approaches_greedy():
    torch.manual_seed(1)
    row = torch.randn(40)
    top = int(row.argmax())
    row[top] += 0.5  # a clear winner: at T=0.01 the runner-up has odds below e^-50
    counts = draw_many(row, SamplingParams(temperature=0.01), 500)
    assert counts == Counter({top: 500})


def test_top_k_1_is_greedy_even_at_high_temperature():
    torch.manual_seed(2)
    row = torch.randn(40)
    counts = draw_many(row, SamplingParams(temperature=5.0, top_k=1), 300)
    assert counts == Counter({int(row.argmax()): 300})
    tie = torch.zeros(10)  # all tied: exactly one token kept, the lowest id
    assert kept(tie, SamplingParams(top_k=1)) == {0}
    assert kept(tie, SamplingParams(top_k=3)) == {0, 1, 2}


# ---- the distribution --------------------------------------------------------------------------

def test_temperature_1_matches_softmax():
    probs = [0.4, 0.25, 0.2, 0.1, 0.05]
    n = 10_000
    counts = draw_many(logits_of(probs), SamplingParams(), n, seed=123)
    chi2 = sum((counts[i] - n * p) ** 2 / (n * p) for i, p in enumerate(probs))
    assert chi2 < 18.47  # chi-square, 4 degrees of freedom, p = 0.001


def test_temperature_rescales_the_distribution():
    probs = [0.6, 0.3, 0.1]
    t = 2.0
    scaled = torch.tensor(probs).pow(1 / t)
    expected = (scaled / scaled.sum()).tolist()
    n = 10_000
    counts = draw_many(logits_of(probs), SamplingParams(temperature=t), n, seed=7)
    chi2 = sum((counts[i] - n * p) ** 2 / (n * p) for i, p in enumerate(expected))
    assert chi2 < 13.82  # 2 degrees of freedom, p = 0.001


def test_top_p_keeps_exactly_the_nucleus():
    probs = [0.5, 0.3, 0.15, 0.05]
    row = logits_of(probs)
    assert kept(row, SamplingParams(top_p=0.75)) == {0, 1}
    assert kept(row, SamplingParams(top_p=0.85)) == {0, 1, 2}
    assert kept(row, SamplingParams(top_p=0.01)) == {0}  # the top token always stays
    assert kept(row, SamplingParams(top_p=1.0)) == {0, 1, 2, 3}

    n = 5_000
    counts = draw_many(row, SamplingParams(top_p=0.75), n, seed=11)
    assert set(counts) == {0, 1}  # nothing outside the nucleus, ever
    assert counts[0] / n == pytest.approx(0.5 / 0.8, abs=0.03)  # renormalized inside it


def reference_nucleus(row: torch.Tensor, top_p: float) -> set[int]:
    """Full stable sort in float64: the smallest most-likely prefix whose mass reaches top_p."""
    probs = torch.softmax(row.double(), dim=-1)
    order = torch.sort(row, descending=True, stable=True).indices
    cum = probs[order].cumsum(0)
    keep = int((cum[:-1] < top_p).sum()) + 1
    return set(order[:keep].tolist())


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.7, 0.95])
def test_top_p_matches_a_full_sort_small_or_large_nucleus(top_p):
    # nuclei from a handful of tokens to thousands: beyond the first candidates, widening them
    row = torch.randn(20_000, generator=torch.Generator().manual_seed(2)) * 1.5
    assert kept(row, SamplingParams(top_p=top_p)) == reference_nucleus(row, top_p)


@pytest.mark.parametrize("vocab, size", [(2_000, 606), (3_000, 1_501)])
def test_top_p_breaks_ties_by_lowest_id(vocab, size):
    # all tokens equally likely: the nucleus is the `size` lowest ids, however topk orders ties
    top_p = (size - 0.5) / vocab
    assert kept(torch.zeros(vocab), SamplingParams(top_p=top_p)) == set(range(size))
    k = size + 7  # top_k first: the nucleus is then taken of k tokens of 1/k each
    after_k = SamplingParams(top_k=k, top_p=(size - 0.5) / k)
    assert kept(torch.zeros(vocab), after_k) == set(range(size))


def test_top_p_applies_to_the_distribution_left_by_top_k():
    row = logits_of([0.4, 0.3, 0.2, 0.1])
    # after top_k=2 the two are 0.571 / 0.429: the first alone reaches 0.55
    assert kept(row, SamplingParams(top_k=2, top_p=0.55)) == {0}
    assert kept(row, SamplingParams(top_k=2, top_p=0.6)) == {0, 1}
    assert kept(row, SamplingParams(top_k=3)) == {0, 1, 2}


def test_top_p_sees_the_temperature_scaled_distribution():
    row = logits_of([0.5, 0.3, 0.15, 0.05])
    assert kept(row, SamplingParams(top_p=0.75)) == {0, 1}
    # at T=0.25 the top token holds 0.5^4 / sum = 0.87 of the mass: it alone reaches 0.75
    assert kept(row, SamplingParams(temperature=0.25, top_p=0.75)) == {0}


def test_min_p_drops_tokens_below_the_fraction_of_the_top_probability():
    probs = [0.5, 0.3, 0.15, 0.05]
    row = logits_of(probs)
    assert kept(row, SamplingParams(min_p=0.2)) == {0, 1, 2}  # threshold 0.1
    assert kept(row, SamplingParams(min_p=0.5)) == {0, 1}  # threshold 0.25
    assert kept(row, SamplingParams(min_p=0.7)) == {0}  # threshold 0.35
    assert kept(row, SamplingParams(min_p=0.0)) == {0, 1, 2, 3}
    counts = draw_many(row, SamplingParams(min_p=0.5), 5_000, seed=5)
    assert set(counts) == {0, 1}


# ---- bias, penalties, masks --------------------------------------------------------------------

def test_logit_bias_forces_and_bans_tokens():
    torch.manual_seed(3)
    row = torch.randn(30)
    forced = draw_many(row, SamplingParams(logit_bias=((17, 100.0),)), 300)
    assert forced == Counter({17: 300})
    top = int(row.argmax())
    banned = draw_many(row, SamplingParams(temperature=0.0, logit_bias=((top, -100.0),)), 5)
    assert top not in banned
    many = draw_many(row, SamplingParams(logit_bias=((top, -100.0),)), 2_000)
    assert top not in many


def test_penalties_and_bias_change_logits_by_the_exact_amounts():
    logits = torch.zeros(2, 8)
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, logit_bias=((3, 2.0),)),
              SamplingParams(frequency_penalty=1.0)]
    out = apply_penalties_and_bias(logits, params, [[3, 3, 5], [1, 1, 1, 6]])
    expected = torch.zeros(2, 8)
    expected[0, 3] = 2.0 - 0.5 - 2 * 0.25  # bias first, then presence once + frequency per count
    expected[0, 5] = -0.5 - 0.25
    expected[1, 1] = -3.0
    expected[1, 6] = -1.0
    assert torch.equal(out, expected)
    assert torch.equal(logits, torch.zeros(2, 8))  # the input is untouched


def test_penalties_apply_before_the_temperature():
    params = SamplingParams(temperature=2.0, presence_penalty=1.0, frequency_penalty=0.5)
    x = processed_logits(torch.zeros(1, 2), [params], [[1, 1]])
    assert x[0].tolist() == [0.0, -(1.0 + 2 * 0.5) / 2.0]


def test_penalties_shift_sampling_on_a_two_token_vocab():
    # equal logits; token 1 penalized by ln 3 -> probabilities 3/4 and 1/4
    params = SamplingParams(presence_penalty=math.log(3))
    n = 5_000
    counts = draw_many(torch.zeros(2), params, n, seed=9, history=[1])
    assert counts[0] / n == pytest.approx(0.75, abs=0.025)  # 4 standard errors


def test_mask_restricts_choices_and_an_empty_mask_raises():
    torch.manual_seed(4)
    row = torch.randn(20)
    mask = torch.zeros(20, dtype=torch.bool)
    mask[[2, 9, 13]] = True
    counts = draw_many(row, SamplingParams(temperature=3.0), 2_000, mask=mask)
    assert set(counts) == {2, 9, 13}
    greedy = sample(row[None], [SamplingParams(temperature=0.0)], [[]], [make_generator(0)],
                    [mask])
    assert greedy[0].token == max((2, 9, 13), key=lambda i: float(row[i]))

    # a None mask leaves its row unconstrained
    out = sample(torch.stack([row, row]), [SamplingParams(temperature=0.0)] * 2, [[], []],
                 [make_generator(0), make_generator(1)], [None, mask])
    assert out[0].token == int(row.argmax())

    with pytest.raises(ValueError, match="allows no token"):
        sample(row[None], [SamplingParams()], [[]], [make_generator(0)],
               [torch.zeros(20, dtype=torch.bool)])
    with pytest.raises(ValueError, match="mask"):
        sample(row[None], [SamplingParams()], [[]], [make_generator(0)],
               [torch.ones(19, dtype=torch.bool)])


# ---- logprobs ----------------------------------------------------------------------------------

def test_logprobs_report_the_raw_distribution():
    torch.manual_seed(5)
    logits = torch.randn(3, 40)
    raw = torch.log_softmax(logits, dim=-1)
    params = [
        SamplingParams(temperature=0.5, logprobs=5, logit_bias=((11, 3.0),),
                       presence_penalty=2.0, top_k=4),
        SamplingParams(logprobs=0),
        SamplingParams(),
    ]
    out = sample(logits, params, [[0, 1, 2]] * 3, [make_generator(6, i) for i in range(3)])

    first = out[0]
    assert first.logprob == pytest.approx(float(raw[0, first.token]), abs=1e-6)
    assert len(first.top_logprobs) == 5
    ids = [t for t, _ in first.top_logprobs]
    values = [v for _, v in first.top_logprobs]
    assert ids == raw[0].topk(5).indices.tolist()  # raw ranking: bias/penalties don't reorder it
    assert values == sorted(values, reverse=True)
    assert values == pytest.approx(raw[0, ids].tolist(), abs=1e-6)

    assert out[1].logprob == pytest.approx(float(raw[1, out[1].token]), abs=1e-6)
    assert out[1].top_logprobs == ()
    assert out[2].logprob is None and out[2].top_logprobs == ()


# ---- seeding and batch invariance --------------------------------------------------------------

def test_make_generator_is_reproducible_and_index_dependent():
    def stream(g: torch.Generator) -> list[float]:
        return torch.rand(8, generator=g).tolist()

    assert stream(make_generator(42)) == stream(make_generator(42, 0))
    assert stream(make_generator(42, 3)) == stream(make_generator(42, 3))
    assert stream(make_generator(42, 0)) != stream(make_generator(42, 1))
    assert stream(make_generator(42)) != stream(make_generator(43))
    assert stream(make_generator(-1)) == stream(make_generator(-1))  # any int seeds
    assert stream(make_generator(None)) != stream(make_generator(None))  # fresh entropy


def _run(target: SamplingParams, target_logits: list[torch.Tensor], seed: int,
         others: int, other_seed: int = 100) -> list[SampledToken]:
    """Samples the target row for len(target_logits) steps, with `others` different rows
    (greedy, nucleus, masked, penalized, their own logits) placed around it. Returns its results."""
    vocab = target_logits[0].shape[0]
    rng = torch.Generator().manual_seed(other_seed)
    kinds = [SamplingParams(temperature=0.0), SamplingParams(top_p=0.9, top_k=50),
             SamplingParams(temperature=0.7, min_p=0.1, presence_penalty=1.0),
             SamplingParams(frequency_penalty=0.5, logit_bias=((3, 5.0),), logprobs=3)]
    other_params = [kinds[i % len(kinds)] for i in range(others)]
    other_gens = [make_generator(other_seed + i) for i in range(others)]
    other_hist: list[list[int]] = [[] for _ in range(others)]
    pos = others // 2  # the target sits in the middle of the batch
    g = make_generator(seed)
    hist: list[int] = []
    results: list[SampledToken] = []
    for step_logits in target_logits:
        rows = list(torch.randn(others, vocab, generator=rng).unbind(0))
        rows.insert(pos, step_logits)
        masks: list[torch.Tensor | None] = [None] * (others + 1)
        if others:
            masks[0 if pos else 1] = torch.rand(vocab, generator=rng) < 0.5
        params = other_params[:pos] + [target] + other_params[pos:]
        gens = other_gens[:pos] + [g] + other_gens[pos:]
        histories = other_hist[:pos] + [hist] + other_hist[pos:]
        out = sample(torch.stack(rows), params, histories, gens, masks)
        for h, t in zip(histories, out):
            h.append(t.token)
        results.append(out[pos])
    return results


@pytest.mark.parametrize("target", [
    SamplingParams(),
    SamplingParams(temperature=0.8, top_p=0.9, top_k=200, min_p=0.01,
                   presence_penalty=0.3, frequency_penalty=0.2, logprobs=4),
])
def test_same_seed_gives_the_same_tokens_alone_and_inside_any_batch(target):
    vocab = 1003  # not a multiple of the SIMD width: lane boundaries move with the batch
    rng = torch.Generator().manual_seed(0)
    steps = [torch.randn(vocab, generator=rng) * 2 for _ in range(50)]
    alone = _run(target, steps, seed=7, others=0)
    assert _run(target, steps, seed=7, others=5) == alone
    assert _run(target, steps, seed=7, others=12, other_seed=300) == alone
    assert len({t.token for t in alone}) > 5  # it really samples
    other_seed = [t.token for t in _run(target, steps, seed=8, others=0)]
    assert other_seed != [t.token for t in alone]  # different seeds differ


def test_processed_row_is_bitwise_identical_alone_and_in_a_batch():
    vocab = 1003
    rng = torch.Generator().manual_seed(1)
    logits = torch.randn(9, vocab, generator=rng)
    params = [SamplingParams(temperature=0.3 + 0.1 * i, top_p=0.5 + 0.05 * i, top_k=10 * i,
                             min_p=0.01 * i, presence_penalty=0.1 * i) for i in range(9)]
    histories = [[i, i + 1, i + 1] for i in range(9)]
    batched = processed_logits(logits, params, histories)
    for r in range(9):
        alone = processed_logits(logits[r:r + 1], params[r:r + 1], histories[r:r + 1])
        assert torch.equal(batched[r], alone[0])


def test_each_row_consumes_its_generator_the_same_whatever_the_batch():
    vocab = 500
    logits = torch.randn(4, vocab)
    params = [SamplingParams(), SamplingParams(top_k=3), SamplingParams(temperature=0.0),
              SamplingParams(top_p=0.5)]
    g_alone = make_generator(1)
    sample(logits[1:2], params[1:2], [[]], [g_alone])
    gens = [make_generator(0), make_generator(1), make_generator(2), make_generator(3)]
    sample(logits, params, [[]] * 4, gens)
    assert torch.equal(gens[1].get_state(), g_alone.get_state())


# ---- validation --------------------------------------------------------------------------------

def test_rejects_mismatched_inputs():
    logits = torch.zeros(2, 5)
    p = SamplingParams()
    with pytest.raises(ValueError):
        sample(logits, [p], [[]], [make_generator(0)])
    with pytest.raises(ValueError):
        sample(logits, [p, p], [[], []], [make_generator(0)])
    with pytest.raises(ValueError):
        sample(logits, [p, p], [[], []], [make_generator(0)] * 2, [None])
    with pytest.raises(ValueError, match="vocabulary"):
        sample(logits[:1], [SamplingParams(logit_bias=((5, 1.0),))], [[]], [make_generator(0)])
    with pytest.raises(ValueError):
        sample(torch.zeros(5), [p], [[]], [make_generator(0)])
    assert sample(torch.zeros(0, 5), [], [], []) == []
