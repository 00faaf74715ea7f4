"""ossrt vs llama.cpp on CPU, side by side, at the gpt-oss-20b shape: prefill, decode at a given
context depth, batched aggregate decode and peak RSS, as one markdown table (ratios ossrt/llama.cpp).

    python bench/vs_llamacpp.py --out /tmp/vs-llamacpp          # llama.cpp first, then ossrt
    python bench/vs_llamacpp.py --peer-json OUT/peer.json --ossrt-json OUT/ossrt.json  # table only

llama.cpp runs through the shared peer script (/work/shared/bench/llamacpp-peer.sh, see its
README); ossrt through `ossrt bench`.  The two run one after the other, never together.  Run it
with the venv's python (ossrt must be importable).  Read the figures as ratios only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from itertools import zip_longest
from pathlib import Path
from typing import Any

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


def _peer_get(runs: list[dict[str, Any]], metric: str, key: int, bdepth: int) -> float | None:
    for r in (run["result"] for run in runs):
        if metric == "prefill" and r.get("prompt_tok_s") and r.get("depth", 0) == 0 \
                and r["prompt_tok_s"].get("n_tokens") == key:
            return r["prompt_tok_s"]["mean"]
        if metric == "decode" and r.get("decode_tok_s") and r["decode_tok_s"].get("depth") == key:
            return r["decode_tok_s"]["mean"]
        if metric == "batched":
            for b in r.get("batched") or []:
                if b.get("batch") == key and b.get("pp") == bdepth:
                    return b["decode_tok_s_aggregate"]
    return None


def _ossrt_get(runs: list[dict[str, Any]], metric: str, key: int, bdepth: int) -> float | None:
    for run in runs:
        r, depth = run["result"], run.get("params", {}).get("decode_prompt_tokens")
        if metric == "prefill" and (r.get("prefill") or {}).get("prompt_tokens") == key:
            return r["prefill"].get("prefill_tok_s")
        want_depth, conc = (key, 1) if metric == "decode" else (bdepth, key)
        if metric in ("decode", "batched") and depth == want_depth:
            for d in r.get("decode") or []:
                if d.get("concurrency") == conc:
                    return d.get("decode_tok_s_aggregate")
    return None


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
            runs.append({"command": " ".join(cmd), "params": {}, "result": run_json(cmd, commands)})
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
            cmd = [sys.executable, "-m", "ossrt.cli", "bench", "--model", str(model),
                   "--prompt-tokens", str(p["prompt_tokens"]),
                   "--decode-tokens", str(a.decode_tokens),
                   "--decode-prompt-tokens", str(p["decode_prompt_tokens"]),
                   "--concurrency", ",".join(map(str, p["concurrency"])), "--threads", str(a.threads),
                   "--dense-dtype", a.ossrt_dense]
            runs.append({"command": " ".join(cmd), "params": p, "result": run_json(cmd, commands)})
            save(a.out, "ossrt.json", {"runs": runs})
        ossrt = {"runs": runs}

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
    print(text)
    save(a.out, "table.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
