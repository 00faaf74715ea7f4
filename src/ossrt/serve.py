"""`ossrt serve`: the composition root that loads the model, starts the engine, and hands
both to the HTTP app (which itself never imports torch)."""

from __future__ import annotations

import glob
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .harmony.tokenizer import cache_root

HF_REPO_DIR = "models--openai--gpt-oss-20b"


@dataclass(frozen=True, slots=True)
class ServeOptions:
    model: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_names: tuple[str, ...] = ()
    data_dir: str | None = None
    dtype: str = "auto"
    dense_dtype: str = "bfloat16"  # or "int8": 8-bit attention/unembedding weights
    kv_cache_gb: float = 2.0
    max_num_seqs: int = 16
    api_key: str | None = None  # one static key (tier "default"); more via `ossrt keys`
    rate_limits: str | None = None  # TOML file of [tiers.NAME] tables
    allow_unauthenticated: bool = False  # serve beyond loopback without keys
    metrics_public: bool = False  # GET /metrics without a key
    max_body_bytes: int = 8 << 20  # larger request bodies get a 413 before parsing
    shutdown_timeout: float = 30.0  # on SIGTERM: s to let open streams finish, then cut them
    request_timeout: float = 600.0  # s one generation may take, queueing included (0: none)
    browser: bool = True  # the built-in browser (Responses API web_search_preview)
    browser_corpus: str | None = None  # its local corpus folder (default DATA_DIR/corpus)
    searxng: str | None = None  # search the web through this SearXNG instance instead
    python_tool: bool = True  # the built-in python tool (code_interpreter), sandboxed
    unsafe_python: bool = False  # run python without a sandbox where bubblewrap cannot run
    python_stateful: bool = False  # keep python's /mnt/data per conversation (response chain)
    max_tool_calls: int = 8  # built-in tool calls per response
    loras: tuple[tuple[str, str], ...] = ()  # (NAME, adapter folder): served as BASE:NAME


def find_default_model() -> tuple[str, bool]:
    """(checkpoint folder, is_tiny): the Hugging Face cache's gpt-oss-20b if present, else the
    tiny random preset, written once into ossrt's cache."""
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.expanduser("~/.cache/huggingface"), "hub")
    for cfg in sorted(glob.glob(os.path.join(hub, HF_REPO_DIR, "snapshots", "*", "config.json"))):
        return str(Path(cfg).parent), False
    tiny = cache_root() / "tiny-random"
    if not (tiny / "config.json").is_file():
        from .model import preset, write_checkpoint

        write_checkpoint(preset("tiny"), tiny, seed=0)
    return str(tiny), True


def build_app(opts: ServeOptions):  # noqa: ANN201 - a FastAPI app
    from .engine.async_engine import AsyncEngine
    from .engine.llm_engine import EngineConfig, LLMEngine
    from .engine.malloc import fix_mmap_threshold
    from .harmony.tokenizer import get_tokenizer
    from .model import load_model
    from .server.agent import configure_builtins
    from .server.app import create_app
    from .server.auth import configure as configure_auth
    from .server.state import ModelCard, ServerState
    from .server.store import ResponseStore

    auth, limiter, auth_banner = configure_auth(  # before loading: refuse an open public bind
        api_key=opts.api_key, rate_limits=opts.rate_limits, host=opts.host,
        data_dir=Path(opts.data_dir) if opts.data_dir else cache_root() / "data",
        allow_unauthenticated=opts.allow_unauthenticated)
    path, tiny = (opts.model, False) if opts.model else find_default_model()
    if tiny:
        print("=" * 72 + "\n  No --model given and no openai/gpt-oss-20b in the Hugging Face cache:\n"
              "  serving the TINY RANDOM preset (random weights, random text) so the\n"
              "  whole API can be tried. Download the real weights and pass --model DIR.\n"
              + "=" * 72, file=sys.stderr)
    fix_mmap_threshold()  # a server's RSS must not creep up with each burst of load
    t0 = time.perf_counter()
    model = load_model(path, opts.dtype, dense_dtype=opts.dense_dtype)
    engine = LLMEngine(model, EngineConfig(kv_cache_bytes=int(opts.kv_cache_gb * (1 << 30)),
                                           max_num_seqs=opts.max_num_seqs))
    names = opts.served_model_names or (
        ("gpt-oss-tiny-random",) if tiny else (Path(path.rstrip("/")).name or "gpt-oss",))
    note = "tiny random preset: random weights, for trying the API" if tiny else None
    cards = [ModelCard(id=n, max_model_len=engine.max_model_len,
                       vocab_size=model.cfg.vocab_size, note=note) for n in names]
    print(f"ossrt: loaded {path} ({model.cfg.num_hidden_layers} layers, "
          f"{str(model.dtype).removeprefix('torch.')}) in {time.perf_counter() - t0:.1f} s; "
          f"serving {', '.join(names)} on http://{opts.host}:{opts.port}", file=sys.stderr)
    data_dir = Path(opts.data_dir) if opts.data_dir else cache_root() / "data"
    front = AsyncEngine(engine)

    def add_adapter(model_id: str, folder: str) -> None:
        front.add_adapter(model_id, load_lora(folder, model))

    for name, folder in opts.loras:  # beside every base name, sharing its weights
        for base in names:
            add_adapter(f"{base}:{name}", folder)
            cards.append(ModelCard(id=f"{base}:{name}", max_model_len=engine.max_model_len,
                                   vocab_size=model.cfg.vocab_size, adapter=f"{base}:{name}",
                                   parent=base))
        print(f"ossrt: LoRA adapter {name} from {folder} served as "
              f"{', '.join(f'{b}:{name}' for b in names)}", file=sys.stderr)
    builtins, tools_banner = configure_builtins(
        data_dir, browser=opts.browser, corpus=opts.browser_corpus, searxng=opts.searxng,
        python=opts.python_tool, unsafe_python=opts.unsafe_python,
        python_stateful=opts.python_stateful,
        max_calls=opts.max_tool_calls)
    print(f"ossrt: {tools_banner}", file=sys.stderr)
    state = ServerState(engine=front, tokenizer=get_tokenizer(), models=cards,
                        store=ResponseStore(data_dir), auth=auth, rate_limits=limiter,
                        metrics_public=opts.metrics_public, engine_stats=engine_stats(engine),
                        request_timeout=opts.request_timeout or None, builtin_tools=builtins,
                        model_dir=path, data_dir=str(data_dir), add_adapter=add_adapter)
    print(f"ossrt: {auth_banner}", file=sys.stderr)
    return create_app(state, max_body_bytes=opts.max_body_bytes)


def load_lora(folder: str, model):  # noqa: ANN001, ANN201 - GptOss -> LoraWeights
    """A PEFT-layout adapter folder (`ossrt finetune` or PEFT, attention/router targets) as
    weights the engine serves beside the base model; ValueError when it does not fit."""
    from .model.lora import LoraWeights
    from .train.peft_io import load_adapter

    adapter = load_adapter(folder, model=model.cfg)
    return LoraWeights.from_tensors(dict(adapter.named()), adapter.spec.scale, model.dtype,
                                    model.device)


def engine_stats(engine):  # noqa: ANN001, ANN201 - an LLMEngine -> its /metrics gauges
    def stats() -> dict[str, float]:
        return {"queue_length": engine.scheduler.num_waiting,
                "running": engine.scheduler.num_running,
                "preemptions": engine.num_preemptions, "kv_cache_usage": engine.kv.usage()}
    return stats


def serve(opts: ServeOptions) -> None:
    import logging

    import uvicorn

    access = logging.getLogger("ossrt.access")  # one JSON line per request, on stderr
    if not access.handlers:
        access.addHandler(logging.StreamHandler())
        access.setLevel(logging.INFO)
        access.propagate = False
    # SIGTERM / Ctrl-C: uvicorn stops accepting, lets open requests (streams included) finish
    # for up to shutdown_timeout s, cancels what is left (closing those connections), then the
    # app's lifespan closes the engine thread and the response store.
    uvicorn.run(build_app(opts), host=opts.host, port=opts.port, log_level="info",
                timeout_graceful_shutdown=max(0.0, opts.shutdown_timeout))
