"""Shared fixtures: a live uvicorn server for any app, on a free loopback port."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest
import torch


def pytest_sessionstart(session) -> None:  # noqa: ANN001 - pytest's hook signature
    """Build the native kernels once, before any test: the servers and CLIs that tests start
    as subprocesses then load them ready-built instead of compiling (a minute on 2 cores)
    inside a request that the test times out on."""
    from ossrt.model import kernels

    kernels.available()


@contextmanager
def _serve(app) -> Iterator[str]:  # noqa: ANN001 - an ASGI app
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def live_server() -> Callable:
    """`with live_server(app) as base_url: ...`"""
    return _serve


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """The tiny model gains nothing from intra-op threads, and on a busy 2-core machine
    OpenMP's spinning threads make it 10x slower; restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _random_paged_storage(cfg, nblocks: int, g: torch.Generator, block_size: int = 4):  # noqa: ANN001, ANN202
    from ossrt.engine.kv_cache import KVCacheSpec
    from ossrt.engine.paged_attention import PagedKVStorage

    storage = PagedKVStorage(cfg, KVCacheSpec(block_size, nblocks, nblocks, cfg.sliding_window,
                                              enable_prefix_caching=False), torch.bfloat16)
    for pool in (*storage.k.values(), *storage.v.values()):
        pool.copy_(torch.randn(pool.shape, generator=g))
    return storage


@pytest.fixture
def random_paged_storage() -> Callable:
    """`random_paged_storage(cfg, nblocks, generator)`: a bf16 paged KV storage (block size 4,
    both pools nblocks long) filled with random values, as a cache mid-conversation."""
    return _random_paged_storage
