"""bench/vs_llamacpp.py: the plans and the table, on small hand-made results shaped like the real
ones (a peer summary.json, an `ossrt bench` output); nothing is run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "bench" / "vs_llamacpp.py"
_spec = importlib.util.spec_from_file_location("vs_llamacpp", _PATH)
vs = importlib.util.module_from_spec(_spec)
sys.modules["vs_llamacpp"] = vs
_spec.loader.exec_module(vs)


def _peer_result(pp: int, tg: int, depth: int, pp_ts: float | None, tg_ts: float | None,
                 rss: float, batched: list[tuple[int, float]] | None = None) -> dict:
    r = {"engine": "llama.cpp", "n_prompt": pp, "n_gen": tg, "depth": depth,
         "prompt_tok_s": None if pp_ts is None else
         {"mean": pp_ts, "stddev": 0.1, "samples": [pp_ts], "n_tokens": pp, "depth": depth},
         "decode_tok_s": None if tg_ts is None else
         {"mean": tg_ts, "stddev": 0.1, "samples": [tg_ts], "n_tokens": tg, "depth": depth + pp},
         "memory_gib": {"peak_rss": rss, "after_load": {}, "end": {}}}
    if batched:
        r["batched"] = [{"batch": b, "pp": 128, "tg": 32, "decode_tok_s_aggregate": v}
                        for b, v in batched]
    return r


def _ossrt_result(pp: int, pp_ts: float, decode: list[tuple[int, float]], rss: float) -> dict:
    return {"model": "/ckpt", "dtype": "bfloat16", "threads": 2, "load_s": 10.0,
            "prefill": {"prompt_tokens": pp, "ttft_s": pp / pp_ts, "prefill_tok_s": pp_ts},
            "decode": [{"concurrency": c, "decode_steps": 32, "decode_tok_s_aggregate": v,
                        "decode_tok_s_per_seq": v / c} for c, v in decode],
            "peak_rss_gib": rss}


PEER = {"runs": [
    {"command": "peer -p 512 -n 0", "params": {},
     "result": _peer_result(512, 0, 0, 20.0, None, 19.8, [(1, 12.0), (4, 15.0), (8, 16.0)])},
    {"command": "peer -d 128 -p 0 -n 32", "params": {},
     "result": _peer_result(0, 32, 128, None, 10.0, 20.5)},
]}
OSSRT = {"runs": [
    {"command": "ossrt bench", "params": {"prompt_tokens": 512, "decode_prompt_tokens": 128,
                                           "concurrency": [1, 4, 8]},
     "result": _ossrt_result(512, 30.0, [(1, 5.0), (4, 12.0), (8, 20.0)], 14.0)},
]}


def _by_metric(rows):
    return {m: (a, b, r) for m, a, b, r in rows}


def test_rows_and_ratios():
    rows = _by_metric(vs.build_rows(PEER, OSSRT, [512], [128], [1, 4, 8]))
    assert rows["prefill 512 tokens (tok/s)"] == (20.0, 30.0, pytest.approx(1.5))
    assert rows["decode at depth 128, 1 sequence (tok/s)"] == (10.0, 5.0, pytest.approx(0.5))
    assert rows["decode aggregate, batch 8 at depth 128 (tok/s)"] == (16.0, 20.0,
                                                                          pytest.approx(1.25))
    # the peak of all the peer's runs
    assert rows["peak RSS (GiB; lower is better)"] == (20.5, 14.0, pytest.approx(14.0 / 20.5))
    assert len(rows) == 1 + 1 + 3 + 1


def test_missing_measurement_is_a_dash():
    rows = vs.build_rows(PEER, OSSRT, [512, 2048], [128, 4096], [1, 4])
    d = _by_metric(rows)
    assert d["prefill 2048 tokens (tok/s)"] == (None, None, None)
    assert d["decode at depth 4096, 1 sequence (tok/s)"] == (None, None, None)
    md = vs.markdown_table(rows)
    assert "| prefill 2048 tokens (tok/s) | - | - | - |" in md
    assert "| prefill 512 tokens (tok/s) | 20.00 | 30.00 | 1.50x |" in md
    # no peer at all (--skip-peer): every llama.cpp cell and ratio is a dash
    rows = vs.build_rows(None, OSSRT, [512], [128], [4])
    assert all(a is None and r is None for _, a, _, r in rows)
    assert "| prefill 512 tokens (tok/s) | - | 30.00 | - |" in vs.markdown_table(rows)


def test_batched_needs_the_same_depth():
    # the peer's batched runs were at 128 tokens per sequence; at depth 256 nothing matches
    rows = _by_metric(vs.build_rows(PEER, OSSRT, [512], [256], [4]))
    assert rows["decode aggregate, batch 4 at depth 256 (tok/s)"] == (None, None, None)


def test_bare_results_are_accepted():
    # a peer summary.json and an `ossrt bench` output as printed (no depth recorded for ossrt)
    peer = _peer_result(128, 16, 0, 15.2, 9.2, 19.8)
    ossrt = _ossrt_result(128, 9.8, [(1, 3.3)], 14.05)
    rows = _by_metric(vs.build_rows(peer, ossrt, [128], [128], []))
    assert rows["prefill 128 tokens (tok/s)"] == (15.2, 9.8, pytest.approx(9.8 / 15.2))
    assert rows["decode at depth 128, 1 sequence (tok/s)"] == (9.2, None, None)


def test_plans():
    peer = vs.plan_peer([512, 2048], [128, 2048], [1, 4, 8], 32, 2, 3, "q8_0")
    tail = ["-t", "2", "-r", "3", "--dense", "q8_0"]
    assert peer == [
        ["-p", "512", "-n", "0", "--batched", "1,4,8", "--batched-pp", "128", "--batched-tg", "32",
         *tail],
        ["-p", "2048", "-n", "32", *tail],       # decode right after a 2048 prompt = depth 2048
        ["-d", "128", "-p", "0", "-n", "32", *tail],
    ]
    assert vs.plan_ossrt([512, 2048], [128, 4096, 8192], [4, 8]) == [
        {"prompt_tokens": 512, "decode_prompt_tokens": 128, "concurrency": [1, 4, 8]},
        {"prompt_tokens": 2048, "decode_prompt_tokens": 4096, "concurrency": [1]},
        {"prompt_tokens": 512, "decode_prompt_tokens": 8192, "concurrency": [1]},
    ]


def test_parse_json_output_skips_leading_lines():
    text = "Using /x as PyTorch extensions root...\n" + json.dumps({"a": {"b": 1}}, indent=2)
    assert vs.parse_json_output(text) == {"a": {"b": 1}}


def test_main_table_only(tmp_path, capsys):
    (tmp_path / "peer.json").write_text(json.dumps(PEER))
    (tmp_path / "ossrt.json").write_text(json.dumps(OSSRT))
    out = tmp_path / "out"
    assert vs.main(["--skip-peer", "--peer-json", str(tmp_path / "peer.json"),
                    "--ossrt-json", str(tmp_path / "ossrt.json"), "--prompt-tokens", "512",
                    "--depths", "128", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| decode aggregate, batch 4 at depth 128 (tok/s) | 15.00 | 12.00 | 0.80x |" in text
    assert "`peer -d 128 -p 0 -n 32`" in text and "AVX-512" in text
    assert "- ossrt: threads 2, dtype bfloat16," in text
    assert (out / "table.md").read_text().strip() == text.strip()


def _with_rates(runs: dict, before: float, after: float, inside: bool) -> dict:
    rates = {"before": {"median": before}, "after": {"median": after}}
    out = json.loads(json.dumps(runs))
    for run in out["runs"]:
        if inside:
            run["result"]["read_gb_s"] = rates
        else:
            run["read_gb_s"] = rates
    return out


def test_bound_rows_put_each_figure_against_bytes_over_rate():
    peer = _with_rates(PEER, 30.0, 34.0, inside=False)  # the peer's rates sit next to its result
    ossrt = _with_rates(OSSRT, 40.0, 44.0, inside=True)  # `ossrt bench` reports its own
    gb = {"llama.cpp": 2.0, "ossrt": 4.0}
    rows = {r[0]: r[1:] for r in vs.bound_rows(peer, ossrt, [128], [4],
                                               lambda e, b, d: gb[e] * (1 + b / 10))}
    ga, gb_, ra, rb, fa, fb = rows["decode at depth 128, 1 sequence"]
    assert (ga, gb_, ra, rb) == (pytest.approx(2.2), pytest.approx(4.4), 32.0, 42.0)
    assert fa == pytest.approx(10.0 / (32.0 / 2.2)) and fb == pytest.approx(5.0 / (42.0 / 4.4))
    *_, fa, fb = rows["decode aggregate, batch 4 at depth 128"]
    assert fa == pytest.approx(15.0 / (4 * 32.0 / 2.8)) and fb == pytest.approx(12.0 / (4 * 42.0 / 5.6))
    table = vs.bound_table(vs.bound_rows(peer, ossrt, [128], [4], lambda e, b, d: 1.0))
    assert "| decode at depth 128, 1 sequence | 1.00 / 1.00 | 32.00 / 42.00 | 31% / 12% |" in table
    # no rate measured: no fraction, not a crash
    rows = vs.bound_rows(PEER, OSSRT, [128], [4], lambda e, b, d: 1.0)
    assert all(r[3] is None and r[5] is None for r in rows)


def test_pairs_table_reports_the_median_ratio():
    def pair(peer_tps: float, ossrt_tps: float) -> dict:
        return {"peer": {"result": _peer_result(0, 0, 0, None, None, 1.0, [(4, peer_tps)]),
                         "read_gb_s": {"before": {"median": 30.0}, "after": {"median": 30.0}}},
                "ossrt": {"params": {"decode_prompt_tokens": 128},
                          "result": _ossrt_result(16, 1.0, [(4, ossrt_tps)], 1.0)}}
    text = vs.pairs_table([pair(10, 12), pair(10, 16), pair(10, 15)], [4], 128)
    assert "| 2 | 4 | 10.00 | 16.00 | 1.60x | 30.00 / - |" in text
    assert "batch 4: median ratio over 3 pairs **1.50x** (range 1.20-1.60x)" in text


def test_step_gb_for_each_engine_format(tmp_path):
    step_gb = vs.step_gb_for(tmp_path, "q8_0", "bfloat16")  # no checkpoint there: the 20b shape
    assert step_gb("ossrt", 1, 0) == pytest.approx(3.71, abs=0.02)  # bf16 dense + 4 experts
    assert step_gb("llama.cpp", 1, 0) < step_gb("ossrt", 1, 0) * 0.7  # its dense q8_0
    assert vs.step_gb_for(tmp_path, "bf16", "bfloat16")("llama.cpp", 4, 128) == \
        pytest.approx(step_gb("ossrt", 4, 128))
