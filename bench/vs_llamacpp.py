"""ossrt vs llama.cpp on CPU, side by side, at the gpt-oss-20b shape: prefill, decode at a given
context depth, batched aggregate decode and peak RSS, as one markdown table (ratios ossrt/llama.cpp).

    python bench/vs_llamacpp.py --out /tmp/vs-llamacpp          # llama.cpp first, then ossrt
    python bench/vs_llamacpp.py --peer-json OUT/peer.json --ossrt-json OUT/ossrt.json  # table only

llama.cpp runs through the shared peer script (/work/shared/bench/llamacpp-peer.sh, see its
README); ossrt through `ossrt bench`.  The two run one after the other, never together.  Run it
with the venv's python (ossrt must be importable).  Read the figures as ratios only.

The machine's read rate is measured around every run (`ossrt.model.membw`, in a child process),
and a second table puts each decode figure against its bandwidth bound: bytes read per step
(each engine's own dense format) over that rate.  With `--pairs N` the batched test is run N
more times, llama.cpp and ossrt alternating, each pair minutes apart, and the median of the
pairs' ratios is reported: on a host whose bandwidth moves from minute to minute this is the
fairer ratio.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from itertools import zip_longest
from pathlib import Path
from typing import Any, Callable

PEER_SCRIPT = "/work/shared/bench/llamacpp-peer.sh"
Row = tuple[str, float | None, float | None, float | None]  # metric, llama.cpp, ossrt, ratio


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


# ------------------------------------------------------------------ plans (which processes to launch)
def plan_peer(prompts: list[int], depths: list[int], batched: list[int], decode_tokens: int,
              threads: int, reps: int, dense: str) -> list[list[str]]:
    """Peer arguments, one list per call.  A call prefills at depth 0 and decodes right after the
    prompt, so a prompt size equal to a depth shares one call; batched rides on the first call."""
    common = ["-t", str(threads), "-r", str(reps), "--dense", dense]
    calls = [["-p", str(p), "-n", str(decode_tokens if p in depths else 0)] for p in prompts]
    calls += [["-d", str(d), "-p", "0", "-n", str(decode_tokens)] for d in depths if d not in prompts]
    if batched:
        extra = ["--batched", ",".join(map(str, batched)), "--batched-pp", str(min(depths)),
                 "--batched-tg", str(decode_tokens)]
        calls[0] += extra
    return [c + common for c in calls]


def plan_ossrt(prompts: list[int], depths: list[int], batched: list[int]) -> list[dict[str, Any]]:
    """`ossrt bench` parameters, one dict per run: each run does one prefill and decodes at one
    depth; the batched concurrencies go to the run at the smallest depth."""
    runs, bdepth, batched_done = [], min(depths), False
    for p, d in zip_longest(prompts, depths):
        p = min(prompts) if p is None else p
        d = min(depths) if d is None else d
        conc = [1]
        if d == bdepth and not batched_done:
            conc, batched_done = sorted({1, *batched}), True
        runs.append({"prompt_tokens": p, "decode_prompt_tokens": d, "concurrency": conc})
    return runs


# ------------------------------------------------------------------ the table (pure)
def load_runs(data: Any) -> list[dict[str, Any]]:
    """Accept this script's saved file ({"runs": [...]}), a list of results, or one bare result
    (a peer summary.json / an `ossrt bench` output) and return [{"command", "params", "result"}]."""
    if isinstance(data, dict) and "runs" in data:
        return data["runs"]
    items = data if isinstance(data, list) else [data]
    return [{"command": None, "params": {}, "result": r} for r in items]


def _peer_find(runs: list[dict[str, Any]], metric: str, key: int, bdepth: int
               ) -> tuple[float | None, dict[str, Any] | None]:
    for run in runs:
        r = run["result"]
        if metric == "prefill" and r.get("prompt_tok_s") and r.get("depth", 0) == 0 \
                and r["prompt_tok_s"].get("n_tokens") == key:
            return r["prompt_tok_s"]["mean"], run
        if metric == "decode" and r.get("decode_tok_s") and r["decode_tok_s"].get("depth") == key:
            return r["decode_tok_s"]["mean"], run
        if metric == "batched":
            for b in r.get("batched") or []:
                if b.get("batch") == key and b.get("pp") == bdepth:
                    return b["decode_tok_s_aggregate"], run
    return None, None


def _peer_get(runs: list[dict[str, Any]], metric: str, key: int, bdepth: int) -> float | None:
    return _peer_find(runs, metric, key, bdepth)[0]


def _ossrt_find(runs: list[dict[str, Any]], metric: str, key: int, bdepth: int
                ) -> tuple[float | None, dict[str, Any] | None]:
    for run in runs:
        r, depth = run["result"], run.get("params", {}).get("decode_prompt_tokens")
        if metric == "prefill" and (r.get("prefill") or {}).get("prompt_tokens") == key:
            return r["prefill"].get("prefill_tok_s"), run
        want_depth, conc = (key, 1) if metric == "decode" else (bdepth, key)
        if metric in ("decode", "batched") and depth == want_depth:
            for d in r.get("decode") or []:
                if d.get("concurrency") == conc:
                    return d.get("decode_tok_s_aggregate"), run
    return None, None


def _ossrt_get(runs: list[dict[str, Any]], metric: str, key: int, bdepth: int) -> float | None:
    return _ossrt_find(runs, metric, key, bdepth)[0]


def _peak(values: list[Any]) -> float | None:
    nums = [v for v in values if isinstance(v, (int, float))]
    return max(nums) if nums else None


def build_rows(peer: Any, ossrt: Any, prompts: list[int], depths: list[int],
               batched: list[int]) -> list[Row]:
    """Rows of (metric, llama.cpp, ossrt, ossrt/llama.cpp) from the two engines' results;
    a value that was not measured is None (its ratio too)."""
    pr, orr = load_runs(peer) if peer else [], load_runs(ossrt) if ossrt else []
    bdepth = min(depths) if depths else 0
    keys = ([("prefill", p, f"prefill {p} tokens (tok/s)") for p in prompts]
            + [("decode", d, f"decode at depth {d}, 1 sequence (tok/s)") for d in depths]
            + [("batched", b, f"decode aggregate, batch {b} at depth {bdepth} (tok/s)")
               for b in batched])
    vals = [(label, _peer_get(pr, m, k, bdepth), _ossrt_get(orr, m, k, bdepth))
            for m, k, label in keys]
    vals.append(("peak RSS (GiB; lower is better)",
                 _peak([(r["result"].get("memory_gib") or {}).get("peak_rss") for r in pr]),
                 _peak([r["result"].get("peak_rss_gib") for r in orr])))
    return [(m, a, b, b / a if a and b is not None else None) for m, a, b in vals]


def settings(data: Any, keys: dict[str, str]) -> str:
    """What the results say they ran with, e.g. "threads 2, dense q8_0" ("?" when not run)."""
    def get(r: dict[str, Any], path: str) -> Any:
        for k in path.split("."):
            r = r.get(k) if isinstance(r, dict) else None
        return r
    runs = load_runs(data) if data else []
    seen = {name: sorted({str(v) for r in runs if (v := get(r["result"], path)) is not None})
            for name, path in keys.items()}
    return ", ".join(f"{name} {'/'.join(vals) or '?'}" for name, vals in seen.items())


def fmt(v: float | None, suffix: str = "") -> str:
    return "-" if v is None else f"{v:.2f}{suffix}"


def markdown_table(rows: list[Row]) -> str:
    lines = ["| metric | llama.cpp | ossrt | ossrt / llama.cpp |", "|---|---:|---:|---:|"]
    lines += [f"| {m} | {fmt(a)} | {fmt(b)} | {fmt(r, 'x')} |" for m, a, b, r in rows]
    return "\n".join(lines)


def read_rate(run: dict[str, Any] | None) -> float | None:
    """GB/s around a run: the mean of the medians measured before and after it (a peer run
    carries them next to its result, an `ossrt bench` result inside it)."""
    if not run:
        return None
    rates = run.get("read_gb_s") or run.get("result", {}).get("read_gb_s") or {}
    meds = [v["median"] for v in rates.values() if isinstance(v, dict) and v.get("median")]
    return sum(meds) / len(meds) if meds else None


BoundRow = tuple[str, float | None, float | None, float | None, float | None, float | None,
                 float | None]  # metric, GB/step x2, GB/s x2, fraction of bound x2


def bound_rows(peer: Any, ossrt: Any, depths: list[int], batched: list[int],
               step_gb: Callable[[str, int, int], float]) -> list[BoundRow]:
    """Each decode figure against its bandwidth bound: step_gb(engine, batch, depth) bytes (GB)
    a step reads, the read rate around the run that measured it, and tok/s / (batch * rate /
    step_gb) for each engine ("llama.cpp", "ossrt"); None where not measured."""
    pr, orr = load_runs(peer) if peer else [], load_runs(ossrt) if ossrt else []
    bdepth = min(depths) if depths else 0
    keys = ([("decode", d, 1, d, f"decode at depth {d}, 1 sequence") for d in depths]
            + [("batched", b, b, bdepth, f"decode aggregate, batch {b} at depth {bdepth}")
               for b in batched])
    rows: list[BoundRow] = []
    for metric, key, batch, depth, label in keys:
        cells: list[tuple[float, float | None, float | None]] = []
        for engine, (tok_s, run) in (("llama.cpp", _peer_find(pr, metric, key, bdepth)),
                                     ("ossrt", _ossrt_find(orr, metric, key, bdepth))):
            gb, rate = step_gb(engine, batch, depth), read_rate(run)
            frac = tok_s / (batch * rate / gb) if tok_s and rate else None
            cells.append((gb, rate, frac))
        (ga, ra, fa), (gb_, rb, fb) = cells
        rows.append((label, ga, gb_, ra, rb, fa, fb))
    return rows


def bound_table(rows: list[BoundRow]) -> str:
    lines = ["| decode figure | GB read per step, llama.cpp / ossrt | read rate around the run "
             "(GB/s), llama.cpp / ossrt | share of the bound, llama.cpp / ossrt |",
             "|---|---:|---:|---:|"]
    pct = lambda v: "-" if v is None else f"{100 * v:.0f}%"  # noqa: E731
    lines += [f"| {m} | {fmt(ga)} / {fmt(gb)} | {fmt(ra, '')} / {fmt(rb, '')} | "
              f"{pct(fa)} / {pct(fb)} |" for m, ga, gb, ra, rb, fa, fb in rows]
    return "\n".join(lines)


def pairs_table(pairs: list[dict[str, Any]], batched: list[int], bdepth: int) -> str:
    """The alternating batched runs: per pair and batch size both engines' aggregate tok/s, the
    ratio and the read rate around each run; then the median ratio per batch size."""
    lines = ["| pair | batch | llama.cpp (tok/s) | ossrt (tok/s) | ossrt / llama.cpp | "
             "read rate (GB/s), llama.cpp / ossrt run |", "|---:|---:|---:|---:|---:|---:|"]
    ratios: dict[int, list[float]] = {b: [] for b in batched}
    for i, p in enumerate(pairs, 1):
        for b in batched:
            a = _peer_get([p["peer"]], "batched", b, bdepth)
            o = _ossrt_get([p["ossrt"]], "batched", b, bdepth)
            r = o / a if a and o is not None else None
            if r is not None:
                ratios[b].append(r)
            lines.append(f"| {i} | {b} | {fmt(a)} | {fmt(o)} | {fmt(r, 'x')} | "
                         f"{fmt(read_rate(p['peer']))} / {fmt(read_rate(p['ossrt']))} |")
    lines.append("")
    lines += [f"- batch {b}: median ratio over {len(v)} pairs **{statistics.median(v):.2f}x** "
              f"(range {min(v):.2f}-{max(v):.2f}x)" for b, v in ratios.items() if v]
    return "\n".join(lines)


# ------------------------------------------------------------------ running things
def cpu_info() -> tuple[str, str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "?", "?"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = [f for f in fields.get("Flags", "").split() if f.startswith("avx512")]
    return fields.get("Model name", "?").strip(), " ".join(flags) or "none"


def parse_json_output(text: str) -> dict[str, Any]:
    """The JSON object a tool printed on stdout, skipping any lines printed before it."""
    starts = [0] + [i + 1 for i, c in enumerate(text) if c == "\n" and text[i + 1:i + 2] == "{"]
    for i in starts:
        try:
            return json.loads(text[i:])
        except json.JSONDecodeError:
            continue
    raise ValueError(f"no JSON object in the output: {text[:200]!r}")


def run_json(cmd: list[str], log: list[str]) -> dict[str, Any]:
    shown = " ".join(cmd)
    print(f"[vs_llamacpp] running: {shown}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
    log.append(f"`{shown}` ({time.perf_counter() - t0:.0f} s)")
    return parse_json_output(out)


PROBE = ("import json, sys, torch; torch.set_num_threads(int(sys.argv[1])); "
         "from ossrt.model.membw import read_bandwidth, summary; "
         "print(json.dumps(summary(read_bandwidth())))")


def probe(threads: int) -> dict[str, float] | None:
    """The machine's read rate now (`membw.read_bandwidth` in a child process, so that this one
    holds no torch while the engines run); None if it cannot be measured here."""
    try:
        out = subprocess.run([sys.executable, "-c", PROBE, str(threads)], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, check=True).stdout
        return parse_json_output(out)
    except (subprocess.CalledProcessError, ValueError):
        return None


def run_measured(cmd: list[str], log: list[str], threads: int, params: dict[str, Any],
                 peer: bool) -> dict[str, Any]:
    """One engine run as {"command", "params", "result"}; a peer run also gets the read rate
    measured right before and after it ("read_gb_s"; `ossrt bench` measures its own)."""
    before = probe(threads) if peer else None
    run = {"command": " ".join(cmd), "params": params, "result": run_json(cmd, log)}
    if peer:
        run["read_gb_s"] = {"before": before, "after": probe(threads)}
    return run


def step_gb_for(model: Path, peer_dense: str, ossrt_dense: str) -> Callable[[str, int, int], float]:
    """GB a decode step reads for each engine: the peer's GGUF has the 20b shape with its dense
    format; ossrt the checkpoint's config with its dense format."""
    from ossrt.model import preset
    from ossrt.model.config import GptOssConfig
    from ossrt.model.membw import step_bytes
    cfg = GptOssConfig.from_checkpoint_dir(model)[0] if (model / "config.json").exists() \
        else preset("20b")
    peer_fmt = "bfloat16" if peer_dense == "bf16" else peer_dense

    def step_gb(engine: str, batch: int, depth: int) -> float:
        if engine == "llama.cpp":
            return step_bytes(preset("20b"), batch, depth, peer_fmt).total / 1e9
        return step_bytes(cfg, batch, depth, ossrt_dense).total / 1e9
    return step_gb


def warm_page_cache(model_dir: Path) -> str:
    """Read every file of the checkpoint once (untimed): llama.cpp's run evicts it."""
    t0, total, buf = time.perf_counter(), 0, bytearray(64 << 20)
    for f in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                total += n
    secs = time.perf_counter() - t0
    msg = f"read the checkpoint's {total / 1e9:.1f} GB once ({secs:.0f} s, untimed) to warm the page cache"
    print(f"[vs_llamacpp] {msg}", file=sys.stderr, flush=True)
    return msg


def save(out: Path | None, name: str, data: Any) -> None:
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(data if isinstance(data, str) else json.dumps(data, indent=1) + "\n")


def reuse(path: Path, engine: str, commands: list[str]) -> Any:
    data = json.loads(path.read_text())
    commands += [f"{engine} reused from {path}"] + [
        f"`{r['command']}`" for r in load_runs(data) if r.get("command")]
    return data


def ossrt_cmd(a: argparse.Namespace, model: Path, p: dict[str, Any]) -> list[str]:
    return [sys.executable, "-m", "ossrt.cli", "bench", "--model", str(model),
            "--prompt-tokens", str(p["prompt_tokens"]), "--decode-tokens", str(a.decode_tokens),
            "--decode-prompt-tokens", str(p["decode_prompt_tokens"]),
            "--concurrency", ",".join(map(str, p["concurrency"])), "--threads", str(a.threads),
            "--dense-dtype", a.ossrt_dense]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="/work/ckpt-20b", help="ossrt checkpoint (made if absent)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dense", choices=["q8_0", "bf16"], default="q8_0", help="llama.cpp's GGUF")
    ap.add_argument("--prompt-tokens", type=int_list, default=[512, 2048],
                    help="comma list: prefill sizes")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--depths", type=int_list, default=[128, 4096],
                    help="comma list: context before decode")
    ap.add_argument("--batched", type=int_list, default=[1, 4, 8],
                    help="comma list of batch sizes ('' for none)")
    ap.add_argument("--ossrt-dense", choices=["bfloat16", "int8"], default="bfloat16",
                    help="ossrt's dense weights (`ossrt bench --dense-dtype`)")
    ap.add_argument("--reps", type=int, default=2, help="llama.cpp repetitions (after a warm-up)")
    ap.add_argument("--skip-peer", action="store_true", help="no llama.cpp run")
    ap.add_argument("--peer-json", type=Path, help="reuse a saved llama.cpp result")
    ap.add_argument("--ossrt-json", type=Path, help="reuse a saved ossrt result")
    ap.add_argument("--peer-script", default=PEER_SCRIPT)
    ap.add_argument("--pairs", type=int, default=0,
                    help="then run the batched test N more times, the engines alternating")
    ap.add_argument("--out", type=Path, help="write peer.json, ossrt.json and table.md here")
    a = ap.parse_args(argv)
    if not a.prompt_tokens or not a.depths or a.decode_tokens < 1:
        ap.error("--prompt-tokens and --depths need at least one value; --decode-tokens >= 1")

    commands: list[str] = []
    notes: list[str] = []
    peer: Any = None
    if a.peer_json:
        peer = reuse(a.peer_json, "llama.cpp", commands)
    elif not a.skip_peer:
        runs = []
        for args in plan_peer(a.prompt_tokens, a.depths, a.batched, a.decode_tokens,
                              a.threads, a.reps, a.dense):
            cmd = [a.peer_script, *args]
            runs.append(run_measured(cmd, commands, a.threads, {}, peer=True))
            save(a.out, "peer.json", {"runs": runs})  # kept even if a later run fails
        peer = {"runs": runs}

    ossrt: Any = None
    if a.ossrt_json:
        ossrt = reuse(a.ossrt_json, "ossrt", commands)
    else:
        model = Path(a.model)
        if not (model / "config.json").exists():
            mk = [sys.executable, "-m", "ossrt.cli", "make-checkpoint", "--preset", "20b",
                  "--out", str(model)]
            print(f"[vs_llamacpp] no checkpoint, making it: {' '.join(mk)}", file=sys.stderr)
            subprocess.run(mk, check=True)
            commands.append(f"`{' '.join(mk)}`")
        notes.append(warm_page_cache(model))  # a llama.cpp run (this one or one before) evicts it
        runs = []
        for p in plan_ossrt(a.prompt_tokens, a.depths, a.batched):
            runs.append(run_measured(ossrt_cmd(a, model, p), commands, a.threads, p, peer=False))
            save(a.out, "ossrt.json", {"runs": runs})
        ossrt = {"runs": runs}

    pairs: list[dict[str, Any]] = []
    bdepth = min(a.depths)
    for i in range(a.pairs if a.batched else 0):
        peer_args = ["-p", "0", "-n", "0", "--batched", ",".join(map(str, a.batched)),
                     "--batched-pp", str(bdepth), "--batched-tg", str(a.decode_tokens),
                     "-t", str(a.threads), "-r", "1", "--dense", a.dense]
        p = {"prompt_tokens": 16, "decode_prompt_tokens": bdepth, "concurrency": a.batched}
        pairs.append({"peer": run_measured([a.peer_script, *peer_args], commands, a.threads, {},
                                           peer=True)})
        pairs[-1]["ossrt"] = run_measured(ossrt_cmd(a, Path(a.model), p), commands, a.threads,
                                          p, peer=False)
        save(a.out, "pairs.json", pairs)

    rows = build_rows(peer, ossrt, a.prompt_tokens, a.depths, a.batched)
    model_name, avx512 = cpu_info()
    header = [
        "# ossrt vs llama.cpp, CPU, gpt-oss-20b shape (random weights)", "",
        f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- CPU: {model_name}, {os.cpu_count()} CPUs; AVX-512: {avx512}",
        f"- llama.cpp: {settings(peer, {'threads': 'threads', 'dense': 'model.dense', 'reps': 'reps'})}"
        "; prefill and decode are means of the reps after an untimed warm-up repetition, "
        "batched decode one sample",
        f"- ossrt: {settings(ossrt, {'threads': 'threads', 'dtype': 'dtype', 'dense': 'dense_dtype'})}, MXFP4 experts; "
        "one sample per figure, after an untimed prefill of the same size",
        f"- decode steps per figure: {a.decode_tokens}; peak RSS counts mapped file pages for "
        "both (llama.cpp also keeps repacked copies of the experts)",
        *(f"- {n}" for n in notes),
        "- commands, in order:", *(f"  {i + 1}. {c}" for i, c in enumerate(commands)), "", "",
    ]
    text = "\n".join(header) + markdown_table(rows) + "\n"
    try:
        step_gb = step_gb_for(Path(a.model), a.dense, a.ossrt_dense)
    except ImportError:  # ossrt not importable: no bound table
        step_gb = None
    if step_gb:
        text += ("\nBandwidth bound: bytes a step reads (`ossrt.model.membw.step_bytes`, experts "
                 "expected under uniform routing) over the read rate measured around the run:\n\n"
                 + bound_table(bound_rows(peer, ossrt, a.depths, a.batched, step_gb)) + "\n")
    if pairs:
        text += (f"\nBatched decode in {len(pairs)} more pairs of runs, llama.cpp then ossrt "
                 f"(depth {bdepth}, {a.decode_tokens} steps):\n\n"
                 + pairs_table(pairs, a.batched, bdepth) + "\n")
    print(text)
    save(a.out, "table.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
