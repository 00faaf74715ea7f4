"""The `ossrt` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import __version__
from .chat_cli import register_cli as _register_chat_cli
from .tools.cli import register_cli as _register_tool_cli
from .train.cli import register_cli as _register_train_cli


def _cmd_make_checkpoint(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .model import GptOssConfig, preset
    from .model.checkpoint import DEFAULT_SHARD_BYTES, checkpoint_nbytes, write_checkpoint

    cfg = preset(args.preset)
    if args.config:
        data = json.loads(Path(args.config).read_text())
        cfg = (GptOssConfig.from_original_dict(data) if "num_experts" in data
               else GptOssConfig.from_hf_dict(data))
    layouts = ["hf", "original"] if args.layout == "both" else [args.layout]
    shard = int(args.max_shard_gb * (1 << 30)) if args.max_shard_gb else DEFAULT_SHARD_BYTES
    total = sum(checkpoint_nbytes(cfg, lay) for lay in layouts)
    t0 = time.perf_counter()
    with tqdm(total=total, unit="B", unit_scale=True, desc="writing") as bar:
        for lay in layouts:
            write_checkpoint(cfg, args.out, layout=lay, seed=args.seed, max_shard_bytes=shard,
                             progress=bar.update)
    params = cfg.num_parameters()
    print(f"wrote {', '.join(layouts)} checkpoint to {args.out}: {params['total'] / 1e6:.1f}M "
          f"parameters ({params['active'] / 1e6:.1f}M active), {total / 1e9:.2f} GB, "
          f"seed {args.seed}, {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from .engine import SamplingParams
    from .engine.single import GenerationResult, stream_tokens
    from .harmony import get_tokenizer
    from .harmony.detok import IncrementalDecoder
    from .model import load_model

    tok = get_tokenizer()
    t0 = time.perf_counter()
    model = load_model(args.model, args.dtype, args.device, args.layout,
                       dense_dtype=args.dense_dtype)
    load_s = time.perf_counter() - t0
    prompt = tok.encode(args.prompt)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens,
                            seed=args.seed, stop_token_ids=tok.stop_token_ids)
    result = GenerationResult(prompt)
    text = None if args.json else IncrementalDecoder(tok)
    for token in stream_tokens(model, prompt, params, result):
        if text:
            sys.stdout.write(text.push(token))
            sys.stdout.flush()
    if text:
        sys.stdout.write(text.flush())
    decode_tps = (len(result.token_ids) - 1) / result.decode_seconds if len(
        result.token_ids) > 1 and result.decode_seconds > 0 else None
    if args.json:
        print(json.dumps({
            "prompt_token_ids": prompt, "token_ids": result.token_ids,
            "text": tok.decode(result.token_ids), "finish_reason": result.finish_reason,
            "load_seconds": round(load_s, 3), "prefill_seconds": round(result.prefill_seconds, 4),
            "decode_tokens_per_second": round(decode_tps, 3) if decode_tps else None,
        }))
    else:
        print()
        print(f"[{len(prompt)} prompt tokens, {len(result.token_ids)} generated "
              f"({result.finish_reason}); load {load_s:.1f} s, prefill "
              f"{result.prefill_seconds:.2f} s"
              + (f", decode {decode_tps:.2f} tok/s]" if decode_tps else "]"), file=sys.stderr)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .model.loader import read_config, resolve_layout

    root, layout = resolve_layout(args.model, args.layout)
    cfg = read_config(root, layout)
    print(json.dumps({"layout": layout, "config": cfg.to_dict(),
                      "parameters": cfg.num_parameters()}, indent=2))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    conc = tuple(int(c) for c in args.concurrency.split(","))
    print(json.dumps(run_bench(args.model, dtype=args.dtype, prompt_tokens=args.prompt_tokens,
                               decode_tokens=args.decode_tokens,
                               decode_prompt_tokens=args.decode_prompt_tokens,
                               concurrency=conc, threads=args.threads,
                               kv_cache_gb=args.kv_cache_gb, dense_dtype=args.dense_dtype),
                     indent=2))
    return 0


def _lora_arg(value: str) -> tuple[str, str]:
    name, eq, folder = value.partition("=")
    if not eq or not name or not folder or not all(c.isalnum() or c in "-_." for c in name):
        raise SystemExit(f"ossrt serve: --lora wants NAME=DIR (NAME of letters, digits, -_.), "
                         f"not {value!r}")
    return name, folder


def _cmd_serve(args: argparse.Namespace) -> int:
    from .serve import ServeOptions, serve

    serve(ServeOptions(model=args.model, host=args.host, port=args.port,
                       served_model_names=tuple(args.served_model_name or ()),
                       data_dir=args.data_dir, dtype=args.dtype, dense_dtype=args.dense_dtype,
                       kv_cache_gb=args.kv_cache_gb,
                       max_num_seqs=args.max_num_seqs, api_key=args.api_key,
                       rate_limits=args.rate_limits,
                       allow_unauthenticated=args.allow_unauthenticated,
                       metrics_public=args.metrics_public,
                       max_body_bytes=int(args.max_body_mb * (1 << 20)),
                       shutdown_timeout=args.shutdown_timeout,
                       request_timeout=args.request_timeout,
                       browser=not args.no_browser, browser_corpus=args.browser_corpus,
                       searxng=args.searxng, python_tool=not args.no_python,
                       unsafe_python=args.unsafe_python,
                       python_stateful=args.python_stateful, max_tool_calls=args.max_tool_calls,
                       loras=tuple(_lora_arg(a) for a in args.lora or ())))
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    from .harmony.tokenizer import cache_root
    from .server.keys import KeyStore

    store = KeyStore(Path(args.data_dir) if args.data_dir else cache_root() / "data")
    if args.action == "create":
        rec, key = store.create(args.tier)
        print(key)
        print(f"created {rec.id} (tier {rec.tier}) in {store.path}: this key is shown only once",
              file=sys.stderr)
    elif args.action == "list":
        for rec in store.list(include_revoked=args.all):
            print(json.dumps(rec.to_dict()))
    else:
        if not args.key_id:
            raise ValueError("revoke needs a key id (see `ossrt keys list`) or the key")
        rec = store.revoke(args.key_id)
        if rec is None:
            raise ValueError(f"no live key {args.key_id!r} in {store.path}")
        print(f"revoked {rec.id} ({rec.hint}, tier {rec.tier})", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ossrt", description="The gpt-oss runtime.")
    p.add_argument("--version", action="version", version=f"ossrt {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    mk = sub.add_parser("make-checkpoint", help="write a random checkpoint in the released layout")
    mk.add_argument("--preset", choices=["tiny", "20b", "120b"], default="tiny")
    mk.add_argument("--config", help="config.json (either layout) to use instead of the preset")
    mk.add_argument("--out", required=True, help="folder to write")
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--layout", choices=["hf", "original", "both"], default="hf")
    mk.add_argument("--max-shard-gb", type=float, default=None,
                    help="largest safetensors shard of the hf layout (default 4)")
    mk.set_defaults(func=_cmd_make_checkpoint)

    gen = sub.add_parser("generate", help="continue a raw text prompt (no chat format)")
    gen.add_argument("--model", required=True, help="checkpoint folder")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto")
    gen.add_argument("--dense-dtype", choices=["bfloat16", "int8"], default="bfloat16",
                     help="int8: attention and unembedding weights in 8 bits (q8_0-like, "
                          "faster CPU decode, small logit error; see BENCHMARKS.md)")
    gen.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    gen.add_argument("--layout", choices=["hf", "original"], default=None)
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    gen.set_defaults(func=_cmd_generate)

    srv = sub.add_parser("serve", help="serve the OpenAI-compatible API")
    srv.add_argument("--model", default=None, help="checkpoint folder (default: gpt-oss-20b from "
                     "the Hugging Face cache, else the tiny random preset)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--served-model-name", action="append", help="model id(s) to answer to")
    srv.add_argument("--data-dir", default=None,
                     help="where stored responses, files, fine-tuning jobs and keys live "
                     "(default ~/.cache/ossrt/data)")
    srv.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto")
    srv.add_argument("--dense-dtype", choices=["bfloat16", "int8"], default="bfloat16",
                     help="int8: attention and unembedding weights in 8 bits (q8_0-like, "
                          "faster CPU decode, small logit error; see BENCHMARKS.md)")
    srv.add_argument("--kv-cache-gb", type=float, default=2.0)
    srv.add_argument("--max-num-seqs", type=int, default=16)
    srv.add_argument("--api-key", default=None, help="require this key (Authorization: Bearer "
                     "KEY; tier 'default'); more keys: `ossrt keys create`")
    srv.add_argument("--rate-limits", default=None, help="TOML file of [tiers.NAME] limits "
                     "(see docs/rate-limits.example.toml)")
    srv.add_argument("--allow-unauthenticated", action="store_true",
                     help="serve on a non-loopback --host without any API key")
    srv.add_argument("--metrics-public", action="store_true",
                     help="GET /metrics needs no key even when auth is on")
    srv.add_argument("--max-body-mb", type=float, default=8.0,
                     help="refuse request bodies larger than this (413)")
    srv.add_argument("--shutdown-timeout", type=float, default=30.0,
                     help="on SIGTERM, seconds to let open requests finish before cutting them")
    srv.add_argument("--request-timeout", type=float, default=600.0,
                     help="seconds one generation may take, queueing included (504 / in-band "
                     "error after that; 0 = no limit)")
    srv.add_argument("--lora", action="append", metavar="NAME=DIR",
                     help="serve a LoRA adapter folder beside the base model as MODEL:NAME "
                     "(repeatable; PEFT layout, e.g. from `ossrt finetune`)")
    tools = srv.add_argument_group("built-in tools (Responses API: web_search_preview, "
                                   "code_interpreter)")
    tools.add_argument("--browser-corpus", default=None, metavar="DIR",
                       help="folder of .txt/.md/.html files the browser searches "
                       "(default: DATA_DIR/corpus)")
    tools.add_argument("--searxng", default=None, metavar="URL",
                       help="search the web through this SearXNG instance instead")
    tools.add_argument("--no-browser", action="store_true", help="switch the browser off")
    tools.add_argument("--no-python", action="store_true", help="switch the python tool off")
    tools.add_argument("--unsafe-python", action="store_true",
                       help="where bubblewrap cannot run, run python WITHOUT a sandbox")
    tools.add_argument("--python-stateful", action="store_true",
                       help="keep the python tool's files (/mnt/data) across the calls and "
                       "turns of one conversation (a previous_response_id chain)")
    tools.add_argument("--max-tool-calls", type=int, default=8,
                       help="built-in tool calls per response")
    srv.set_defaults(func=_cmd_serve)

    keys = sub.add_parser("keys", help="manage API keys (stored hashed in DATA_DIR/keys.sqlite3)")
    keys.add_argument("action", choices=["create", "list", "revoke"])
    keys.add_argument("key_id", nargs="?", help="revoke: the key id (or the key itself)")
    keys.add_argument("--tier", default="default", help="create: the key's rate-limit tier")
    keys.add_argument("--all", action="store_true", help="list: include revoked keys")
    keys.add_argument("--data-dir", default=None, help="default: the cache's data folder")
    keys.set_defaults(func=_cmd_keys)

    bench = sub.add_parser("bench", help="engine speed: prefill, decode at 1/4/8 sequences, "
                                         "time to first token, peak RSS (JSON)")
    bench.add_argument("--model", required=True)
    bench.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto")
    bench.add_argument("--dense-dtype", choices=["bfloat16", "int8"], default="bfloat16",
                     help="int8: attention and unembedding weights in 8 bits (q8_0-like, "
                          "faster CPU decode, small logit error; see BENCHMARKS.md)")
    bench.add_argument("--prompt-tokens", type=int, default=512)
    bench.add_argument("--decode-tokens", type=int, default=32)
    bench.add_argument("--decode-prompt-tokens", type=int, default=128)
    bench.add_argument("--concurrency", default="1,4,8")
    bench.add_argument("--threads", type=int, default=None)
    bench.add_argument("--kv-cache-gb", type=float, default=2.0)
    bench.set_defaults(func=_cmd_bench)

    info = sub.add_parser("info", help="show a checkpoint's config and parameter counts")
    info.add_argument("--model", required=True)
    info.add_argument("--layout", choices=["hf", "original"], default=None)
    info.set_defaults(func=_cmd_info)
    _register_train_cli(sub)
    _register_tool_cli(sub)
    _register_chat_cli(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from .model import CheckpointError, ConfigError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, ConfigError, ValueError, OSError) as exc:
        print(f"ossrt {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
