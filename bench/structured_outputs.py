"""Structured-output costs: per-token mask time (llguidance vs xgrammar, same schemas, same
o200k_harmony vocabulary, same token streams) and decode slowdown with constraints on.

    python bench/structured_outputs.py masks                      # engines side by side
    python bench/structured_outputs.py decode --model DIR --batch 1 8 --tokens 48

`masks` needs `pip install xgrammar` for the comparison (it is not an ossrt dependency).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import numpy as np

from ossrt.constraints import GrammarMaskProvider, TurnSpec, compile_turn
from ossrt.constraints.matcher import VOCAB_SIZE, _Vocab
from ossrt.harmony.tokenizer import CHANNEL, END, MESSAGE, RETURN, START, get_tokenizer

# (schema, a valid instance): the instance's tokens are the stream both engines step through.
CASES: dict[str, tuple[dict[str, Any], Any]] = {
    "flat": ({"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer"}, "ok": {"type": "boolean"}},
        "required": ["name", "age", "ok"], "additionalProperties": False},
        {"name": "Ada Lovelace", "age": 36, "ok": True}),
    "nested_array": ({"type": "object", "properties": {"people": {"type": "array", "items": {
        "type": "object", "properties": {"name": {"type": "string"},
                                         "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["name", "tags"], "additionalProperties": False}}},
        "required": ["people"], "additionalProperties": False},
        {"people": [{"name": "Grace", "tags": ["navy", "cobol"]},
                    {"name": "Alan", "tags": ["enigma"]}]}),
    "enum_anyof": ({"type": "object", "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "v": {"anyOf": [{"type": "integer"}, {"type": "string"}, {"type": "null"}]}},
        "required": ["color", "v"], "additionalProperties": False},
        {"color": "green", "v": "forty-two"}),
    "recursive": ({"$defs": {"node": {"type": "object", "properties": {
        "v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
        "required": ["v", "kids"], "additionalProperties": False}}, "$ref": "#/$defs/node"},
        {"v": 1, "kids": [{"v": 2, "kids": []}, {"v": 3, "kids": [{"v": 4, "kids": []}]}]}),
}
# Beyond strict mode: does the engine enforce it, refuse it, or silently ignore it?
COVERAGE: dict[str, tuple[dict[str, Any], str]] = {
    "pattern": ({"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"}, '"abc"'),
    "minLength/maxLength": ({"type": "string", "minLength": 2, "maxLength": 3}, '"abcdef"'),
    "minimum/maximum": ({"type": "integer", "minimum": 3, "maximum": 9}, "12"),
    "minItems/maxItems": ({"type": "array", "items": {"type": "integer"}, "maxItems": 1},
                          "[1,2]"),
    "uniqueItems": ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
                    "[1,1]"),
    "format: date": ({"type": "string", "format": "date"}, '"yesterday"'),
    "not": ({"not": {"type": "string"}}, '"x"'),
}


def _instance_tokens(instance: Any) -> list[int]:
    return get_tokenizer().encode(json.dumps(instance, separators=(",", ":")),
                                  allow_special=False)


def llguidance_per_token(schema: dict[str, Any], tokens: list[int]) -> list[float]:
    """µs to compute each mask while stepping through the answer part of a Harmony turn."""
    tok = get_tokenizer()
    head = [CHANNEL, *tok.encode("analysis", allow_special=False), MESSAGE,
            *tok.encode("Some reasoning first.", allow_special=False), END, START,
            *tok.encode("assistant", allow_special=False), CHANNEL,
            *tok.encode("final", allow_special=False), MESSAGE]
    p = GrammarMaskProvider(compile_turn(TurnSpec(json_answer=True, answer_schema=schema)))
    for t in head:
        p.allowed()
        p.advance(t)
    out = []
    for t in [*tokens, RETURN]:
        t0 = time.perf_counter()
        p._matcher.unsafe_compute_mask_ptr(p._mask.ctypes.data, p._mask.nbytes)
        out.append((time.perf_counter() - t0) * 1e6)
        assert p._matcher.consume_token(t), p._matcher.get_error()
    return out


class XGrammar:
    def __init__(self) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo(_Vocab().tokens, vocab_type=xgr.VocabType.RAW,
                                 vocab_size=VOCAB_SIZE, stop_token_ids=[RETURN])
        self.compiler = xgr.GrammarCompiler(info)

    def per_token(self, schema: dict[str, Any], tokens: list[int]) -> list[float]:
        xgr = self.xgr
        m = xgr.GrammarMatcher(self.compiler.compile_json_schema(json.dumps(schema),
                                                                 any_whitespace=False,
                                                                 separators=(",", ":")))
        mask = xgr.allocate_token_bitmask(1, VOCAB_SIZE)
        out = []
        for t in [*tokens, RETURN]:
            t0 = time.perf_counter()
            m.fill_next_token_bitmask(mask)
            out.append((time.perf_counter() - t0) * 1e6)
            assert m.accept_token(t)
        return out

    def coverage(self, schema: dict[str, Any], bad: str) -> str:
        try:
            m = self.xgr.GrammarMatcher(self.compiler.compile_json_schema(json.dumps(schema)))
        except Exception as exc:  # noqa: BLE001 - refused: report its message
            return f"refused ({str(exc).splitlines()[0][:60]})"
        ok = all(m.accept_token(t) for t in get_tokenizer().encode(bad, allow_special=False))
        return "IGNORED (accepted an invalid value)" if ok else "enforced"


def llguidance_coverage(schema: dict[str, Any], bad: str) -> str:
    from ossrt.constraints import GrammarError

    try:
        p = GrammarMaskProvider(compile_turn(TurnSpec(json_answer=True, answer_schema=schema)))
    except GrammarError as exc:
        return f"refused ({str(exc)[:60]})"
    tok = get_tokenizer()
    head = [CHANNEL, *tok.encode("final", allow_special=False), MESSAGE]
    for t in head + tok.encode(bad, allow_special=False) + [RETURN]:
        p.allowed()
        p.advance(t)
    return "IGNORED (accepted an invalid value)" if p.error is None else "enforced"


def cmd_masks(args: argparse.Namespace) -> None:
    try:
        xg: XGrammar | None = XGrammar()
    except ImportError:
        xg = None
        print("xgrammar not installed: llguidance only")
    print(f"{'schema':14s} {'tokens':>6s} {'llguidance µs/token (mean, p99)':>32s} "
          f"{'xgrammar µs/token (mean, p99)':>31s}")
    for name, (schema, instance) in CASES.items():
        tokens = _instance_tokens(instance)
        cols = []
        for fn in [llguidance_per_token, xg.per_token if xg else None]:
            if fn is None:
                cols.append("-")
                continue
            runs = [fn(schema, tokens) for _ in range(args.repeat)]
            flat = sorted(x for r in runs for x in r)
            cols.append(f"{statistics.mean(flat):8.1f} {flat[int(0.99 * (len(flat) - 1))]:8.1f}")
        print(f"{name:14s} {len(tokens) + 1:6d} {cols[0]:>32s} {cols[1]:>31s}")
    print("\ncoverage beyond strict mode (an invalid value fed token by token):")
    for name, (schema, bad) in COVERAGE.items():
        xg_says = xg.coverage(schema, bad) if xg else "-"
        print(f"  {name:20s} llguidance: {llguidance_coverage(schema, bad):40s} "
              f"xgrammar: {xg_says}")


def cmd_decode(args: argparse.Namespace) -> None:
    import torch

    from ossrt.constraints.matcher import harmony_lltokenizer
    from ossrt.engine.llm_engine import EngineConfig, LLMEngine
    from ossrt.engine.sequence import SamplingParams
    from ossrt.harmony import UserMessage, render_prompt
    from ossrt.harmony.conversation import ResponseFormat
    from ossrt.model import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    harmony_lltokenizer()
    model = load_model(args.model, args.dtype)
    schema = {"type": "object", "properties": {"xs": {"type": "array", "items": {
        "type": "string"}}}, "required": ["xs"], "additionalProperties": False}
    prompt = render_prompt([UserMessage("List some words.")],
                           response_format=ResponseFormat("words", schema))
    # The answer is an unbounded array: a random model keeps writing it until max_tokens.
    compiled = compile_turn(TurnSpec(json_answer=True, answer_schema=schema,
                                     reasoning_budget=args.tokens // 4))
    for batch in args.batch:
        rates = {}
        for constrained in (False, True, False, True):
            engine = LLMEngine(model, EngineConfig(max_num_seqs=batch,
                                                   kv_cache_bytes=args.kv_gb << 30))
            params = SamplingParams(temperature=1.0, seed=0, max_tokens=args.tokens,
                                    stop_token_ids=(RETURN,))
            for i in range(batch):
                engine.add_request(f"r{i}", prompt, params,
                                   (lambda: GrammarMaskProvider(compiled)) if constrained
                                   else None)
            while any(not s.output_token_ids for s in engine.scheduler.running) or \
                    engine.scheduler.waiting:  # prefill and first token: not timed
                engine.step()
            t0, made = time.perf_counter(), 0
            while engine.has_unfinished():
                made += sum(len(o.token_ids) + (o.stop_token_id is not None)
                            for o in engine.step())
            rate = made / (time.perf_counter() - t0)
            rates.setdefault(constrained, []).append(rate)
        free, held = max(rates[False]), max(rates[True])
        print(json.dumps({"batch": batch, "decode_tok_s_unconstrained": round(free, 2),
                          "decode_tok_s_constrained": round(held, 2),
                          "slowdown_pct": round(100 * (1 - held / free), 1)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("masks")
    m.add_argument("--repeat", type=int, default=5)
    d = sub.add_parser("decode")
    d.add_argument("--model", required=True)
    d.add_argument("--dtype", default="bfloat16")
    d.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    d.add_argument("--tokens", type=int, default=48)
    d.add_argument("--threads", type=int, default=0)
    d.add_argument("--kv-gb", type=int, default=1)
    args = ap.parse_args()
    np.seterr(all="ignore")
    {"masks": cmd_masks, "decode": cmd_decode}[args.cmd](args)


if __name__ == "__main__":
    main()
