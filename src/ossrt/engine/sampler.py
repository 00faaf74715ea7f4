"""The engine's batched sampler: logits in, token ids (and OpenAI-style logprobs) out. No text.

Each row of the batch is one sequence that samples this step. Per row, in this order:

    logit_bias -> presence/frequency penalties -> mask -> temperature 0: argmax (lowest id on ties)
    else: / temperature -> top_k -> top_p -> min_p -> draw from the row's own generator

Batch invariance: a row's token depends only on its own logits, params, history, mask and
generator, never on the other rows or on the batch size. The pipeline keeps it so by

* doing across the batch only what is exact elementwise IEEE arithmetic or an exact reduction
  (adding the bias and penalties, masking, dividing by the temperature, max, comparisons, argmax);
* doing per row whatever may round differently with the shape it is given: topk/sort/softmax/
  cumsum for top_k/top_p, log-softmax for logprobs, and the log of the sampling noise;
* drawing with the exponential race (Gumbel-max): token = argmax(logits' - log(E)), with E ~ Exp(1)
  drawn for the full vocabulary row from the row's generator. A sampled row consumes exactly V
  exponentials of its generator per step whatever the batch holds; a greedy row draws nothing.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from .sequence import SampledToken, SamplingParams

# A temperature below this is treated as 0 (greedy): dividing by it would overflow float32 logits.
GREEDY_TEMPERATURE = 1e-5
# How many of the most likely tokens top_p ranks first; it widens 16x while the nucleus is larger.
NUCLEUS_CANDIDATES = 1024


class TokenMaskProvider(Protocol):
    """Per-request constraint hook (structured outputs plug in here): which tokens may come next.

    The engine asks every constrained sequence for `allowed()` before sampling, passes the masks
    to `sample`, and then tells each provider the token that was actually sampled.
    """

    def allowed(self) -> Any:
        """The tokens allowed next, or None for no constraint: either a bool tensor [V]
        (True = allowed) or a packed bitmask of ceil(V/32) int32 words (a numpy array or a
        tensor), bit i % 32 of word i // 32 set when token i is allowed. Providers above the
        engine (the HTTP layer imports no torch) give the bitmask."""
        ...

    def advance(self, token: int) -> None:
        """Told the token actually sampled; the provider moves its state past it."""
        ...


def make_generator(seed: int | None, index: int = 0,
                   device: torch.device | str = "cpu") -> torch.Generator:
    """A per-sequence generator on `device`.

    With a seed, it is seeded from (seed, index): the choice `index` of an n > 1 request gets its
    own stream, and the same (seed, index) always gives the same stream. Without one, it is seeded
    from fresh OS entropy.
    """
    if seed is None:
        value = int.from_bytes(os.urandom(8), "little")
    else:
        digest = hashlib.blake2b(f"ossrt.sampler:{seed}:{index}".encode(), digest_size=8).digest()
        value = int.from_bytes(digest, "little")
    return torch.Generator(device=device).manual_seed(value)


def apply_penalties_and_bias(logits: torch.Tensor, params: Sequence[SamplingParams],
                             output_tokens: Sequence[Sequence[int]]) -> torch.Tensor:
    """logits [B, V] -> a new float32 [B, V] with each row's logit_bias added, then OpenAI's
    penalties subtracted: presence_penalty once for every token id in the row's output so far,
    frequency_penalty times the number of times it occurs there. The input is left unchanged.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    batch, vocab = logits.shape
    if len(params) != batch or len(output_tokens) != batch:
        raise ValueError(f"{batch} rows of logits but {len(params)} params and "
                         f"{len(output_tokens)} output histories")
    out = logits.to(dtype=torch.float32, copy=True)  # [B, V]
    for r, (p, history) in enumerate(zip(params, output_tokens)):
        row = out[r]  # [V], a view
        if p.logit_bias:
            ids = torch.tensor([t for t, _ in p.logit_bias], dtype=torch.long)  # [N]
            _check_ids(ids, vocab, "logit_bias")
            bias = torch.tensor([b for _, b in p.logit_bias], dtype=torch.float32)  # [N]
            row.index_add_(0, ids.to(out.device), bias.to(out.device))  # repeated ids add up
        if (p.presence_penalty or p.frequency_penalty) and len(history) > 0:
            ids, counts = torch.unique(torch.as_tensor(history, dtype=torch.long),
                                       return_counts=True)  # [U], [U]
            _check_ids(ids, vocab, "output_tokens")
            penalty = p.presence_penalty + p.frequency_penalty * counts.to(torch.float32)  # [U]
            row.index_add_(0, ids.to(out.device), -penalty.to(out.device))  # ids are unique
    return out


def processed_logits(logits: torch.Tensor, params: Sequence[SamplingParams],
                     output_tokens: Sequence[Sequence[int]],
                     masks: Sequence[Any] | None = None) -> torch.Tensor:
    """logits [B, V] -> float32 [B, V]: what each row is drawn from.

    Sampled rows: biased, penalized, masked, divided by the temperature, and top_k/top_p/min_p
    filtered (dropped tokens are -inf); the row's distribution is their softmax. Greedy rows
    (temperature 0): biased, penalized and masked only; their token is the row's argmax.
    Raises ValueError when a mask allows no token or a row has no token left.
    """
    x = apply_penalties_and_bias(logits, params, output_tokens)  # [B, V]
    batch, vocab = x.shape
    if masks is not None:
        _apply_masks(x, masks)
    if batch == 0:
        return x
    dead = torch.isneginf(x.amax(dim=-1))  # [B]
    if bool(dead.any()):
        rows = dead.nonzero().flatten().tolist()
        raise ValueError(f"rows {rows} have no token left to sample (all logits are -inf)")

    greedy = [_is_greedy(p) for p in params]
    if all(greedy):
        return x
    temps = torch.tensor([1.0 if g else p.temperature for p, g in zip(params, greedy)],
                         dtype=torch.float32, device=x.device)  # [B]
    x.div_(temps[:, None])  # exact per element, so batch-invariant; greedy rows divide by 1

    for r, (p, g) in enumerate(zip(params, greedy)):
        if not g and (0 < p.top_k < vocab or p.top_p < 1.0):
            _top_k_top_p_row(x[r], p.top_k, p.top_p)

    # min_p: drop p_i < min_p * p_max, i.e. logit_i < logit_max + log(min_p). Others get -inf.
    if any(p.min_p > 0 and not g for p, g in zip(params, greedy)):
        log_min_p = torch.tensor([math.log(p.min_p) if p.min_p > 0 and not g else -math.inf
                                  for p, g in zip(params, greedy)],
                                 dtype=torch.float32, device=x.device)  # [B]
        threshold = x.amax(dim=-1) + log_min_p  # [B]
        x.masked_fill_(x < threshold[:, None], -math.inf)
    return x


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           output_tokens: Sequence[Sequence[int]], generators: Sequence[torch.Generator],
           masks: Sequence[Any] | None = None) -> list[SampledToken]:
    """One token for each row of logits [B, V] (float32, one row per sequence sampling now).

    `output_tokens[r]` is row r's generated tokens so far (for the penalties), `generators[r]` its
    own generator (see make_generator), `masks[r]` an optional mask of allowed tokens (bool [V] or
    a packed int32 bitmask, see TokenMaskProvider.allowed).
    """
    if len(generators) != len(params):
        raise ValueError(f"{len(params)} params but {len(generators)} generators")
    x = processed_logits(logits, params, output_tokens, masks)  # [B, V]
    batch, vocab = x.shape
    if batch == 0:
        return []

    sampled = [r for r, p in enumerate(params) if not _is_greedy(p)]
    if sampled:
        # Exponential race: argmax(p_i / E_i) = argmax(logit_i - log E_i), E_i ~ Exp(1), drawn
        # for the whole row from the row's generator so its consumption never depends on the batch.
        tiny = torch.finfo(torch.float32).tiny
        for r in sampled:
            g = generators[r]
            e = torch.empty(vocab, dtype=torch.float32, device=g.device).exponential_(generator=g)
            # per row: log rounds by SIMD lane on CPU, so a batched log would not be invariant
            x[r].sub_(e.clamp_min_(tiny).log_().to(x.device))  # [V]; -inf (dropped) stays -inf
    tokens = x.argmax(dim=-1)  # [B]; first (lowest) id on ties

    token_list: list[int] = tokens.tolist()
    results = [SampledToken(t) for t in token_list]
    for r, p in enumerate(params):
        if p.logprobs is None:
            continue
        lp = torch.log_softmax(logits[r].to(torch.float32), dim=-1)  # [V] raw, one row at a time
        chosen = float(lp[token_list[r]])
        top: tuple[tuple[int, float], ...] = ()
        if p.logprobs > 0:
            values, ids = torch.topk(lp, min(p.logprobs, vocab))  # [k], [k], best first
            top = tuple(zip(ids.tolist(), values.tolist()))
        results[r] = SampledToken(token_list[r], chosen, top)
    return results


def _is_greedy(p: SamplingParams) -> bool:
    return p.temperature < GREEDY_TEMPERATURE


def _check_ids(ids: torch.Tensor, vocab: int, what: str) -> None:
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"{what} holds a token id outside the vocabulary [0, {vocab})")


def unpack_bitmask(words: Any, vocab: int) -> torch.Tensor:
    """A packed bitmask (ceil(V/32) int32 words, numpy or torch; bit i % 32 of word i // 32 is
    token i) -> bool [vocab]. Little-endian word layout, as llguidance and xgrammar write it."""
    packed = words.cpu().numpy() if isinstance(words, torch.Tensor) else np.asarray(words)
    if packed.dtype != np.int32 or packed.ndim != 1 or packed.size * 32 < vocab:
        raise ValueError(f"a packed mask must be int32 [{(vocab + 31) // 32}], "
                         f"got {packed.dtype} {tuple(packed.shape)}")
    u8 = np.ascontiguousarray(packed).view(np.uint8)  # [4W], little-endian bytes
    return torch.from_numpy(np.unpackbits(u8, bitorder="little")[:vocab].view(np.bool_))


def _apply_masks(x: torch.Tensor, masks: Sequence[Any]) -> None:
    """In place: x [B, V] gets -inf wherever row r's mask disallows the token (bool [V], or a
    packed int32 bitmask; see TokenMaskProvider.allowed)."""
    batch, vocab = x.shape
    if len(masks) != batch:
        raise ValueError(f"{batch} rows of logits but {len(masks)} masks")
    for r, mask in enumerate(masks):
        if mask is None:
            continue
        if not (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool):
            mask = unpack_bitmask(mask, vocab)
        if mask.dtype != torch.bool or tuple(mask.shape) != (vocab,):
            raise ValueError(f"mask of row {r} must be bool [{vocab}], "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        if not bool(mask.any()):
            raise ValueError(f"the mask of row {r} allows no token")
        x[r].masked_fill_(~mask.to(x.device), -math.inf)


def _top_k_top_p_row(row: torch.Tensor, top_k: int, top_p: float) -> None:
    """In place on one row [V] of temperature-scaled logits: keep the top_k largest (exactly k,
    lowest ids first on ties; 0 = off), then the smallest set of the most likely remaining tokens
    whose probability (renormalized after top_k) sums to at least top_p. The top token always stays.

    Avoids sorting the vocabulary: top_k needs only its k-th largest logit, and top_p ranks a few
    candidates with topk, widening them (up to a full sort) only while the nucleus is not yet
    closed strictly inside them.
    """
    vocab = row.shape[0]
    use_k = 0 < top_k < vocab
    if use_k:
        kth = torch.topk(row, top_k, sorted=False).values.min()  # [] the k-th largest logit
        above = row > kth  # [V]
        tied = row == kth  # [V]
        room = top_k - above.sum()  # [] how many of the tied may stay, lowest ids first
        row.masked_fill_(~(above | (tied & (tied.cumsum(0) <= room))), -math.inf)
    if top_p >= 1.0:
        return
    probs = torch.softmax(row, dim=-1)  # [V], renormalized over what top_k left
    n = top_k if use_k else min(vocab, NUCLEUS_CANDIDATES)
    while True:
        ids = _ranked(row, n)  # [n] the n most likely, by logit descending then id ascending
        cum = probs[ids].cumsum(dim=0)  # [n], non-decreasing
        keep = int((cum[:-1] < top_p).sum()) + 1  # i stays while the mass before it is < top_p
        # Outside the candidates lie only zero-probability tokens (top_k), or nothing (n = V), or
        # tokens no more likely than the last candidate: then the nucleus must close before it.
        if use_k or n == vocab:
            break
        if bool(cum[-1] >= top_p) and bool(row[ids[keep - 1]] > row[ids[-1]]):
            break
        n = min(vocab, n * 16)
    drop = torch.ones(vocab, dtype=torch.bool, device=row.device)  # [V]
    drop[ids[:keep]] = False
    row.masked_fill_(drop, -math.inf)


def _ranked(row: torch.Tensor, n: int) -> torch.Tensor:
    """The ids [n] of the n largest entries of row [V], largest first, lowest id first on ties."""
    if n == row.shape[0]:
        return torch.sort(row, descending=True, stable=True).indices
    ids = torch.topk(row, n, sorted=False).indices.sort().values  # [n], ascending ids
    return ids[torch.sort(row[ids], descending=True, stable=True).indices]
