"""Weights in huge pages: copies are exact, the checkpoint mapping's pages are released (and
still read back right), zeroed pools cost nothing until touched, and a model moved into huge
pages (bf16 and int8 dense) computes the same logits as from the mapping."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ossrt.model import hugepages, load_model, preset, write_checkpoint
from ossrt.model.q8 import Q8Weight

needs_thp = pytest.mark.skipif(not hugepages.enabled(), reason="no transparent huge pages here")


def _resident_kib(ptr: int) -> int:
    """Rss of the /proc/self/smaps mapping holding address `ptr`."""
    hit = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=1)[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            hit = lo <= ptr < hi
        elif hit and head == "Rss:":
            return int(line.split()[1])
    raise AssertionError("no mapping holds the pointer")


@needs_thp
def test_copy_is_exact_aligned_and_small_tensors_stay() -> None:
    t = torch.randn(1024, 1024).to(torch.bfloat16)  # 2 MiB
    h = hugepages.to_hugepages(t)
    assert torch.equal(h, t) and h.data_ptr() != t.data_ptr()
    assert h.data_ptr() % hugepages.HUGE == 0 and h.is_contiguous()
    small = torch.randn(100)
    assert hugepages.to_hugepages(small) is small
    nc = torch.randn(2048, 512).t()  # non-contiguous source: a contiguous copy
    assert torch.equal(hugepages.to_hugepages(nc), nc)


def test_disabled_by_environment(monkeypatch) -> None:
    monkeypatch.setenv("OSSRT_NO_HUGEPAGES", "1")
    assert not hugepages.enabled()
    t = torch.randn(1024, 1024)
    assert hugepages.to_hugepages(t) is t


def test_empty_is_zeroed_and_resident_only_when_touched() -> None:
    z = hugepages.empty((64, 1024, 1024), torch.uint8)  # 64 MiB
    assert _resident_kib(z.data_ptr()) < 8 * 1024
    assert int(z[::7, ::131, ::257].count_nonzero()) == 0
    z[5].fill_(3)
    assert int(z.sum()) == 3 * 1024 * 1024


@needs_thp
def test_checkpoint_mapping_is_released_and_still_reads(tmp_path: Path) -> None:
    ref = torch.randn(2048, 1024).to(torch.bfloat16)  # 4 MiB
    save_file({"w": ref}, str(tmp_path / "a.safetensors"))
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        w = f.get_tensor("w")
    files = hugepages.file_mappings()
    assert any(a <= w.data_ptr() < b for a, b in files)
    assert torch.equal(w, ref) and _resident_kib(w.data_ptr()) >= 3 * 1024
    h = hugepages.to_hugepages(w, files)
    assert torch.equal(h, ref)
    assert _resident_kib(w.data_ptr()) < 64  # the mapping's pages are gone from this process
    assert torch.equal(w, ref)  # and come back from the file if read again
    anon = torch.randn(1024, 1024)
    copy = hugepages.to_hugepages(anon, files)  # not a file mapping: left alone
    assert torch.equal(copy, anon) and torch.equal(anon, anon.clone())


@needs_thp
@pytest.mark.parametrize("dense", ["bfloat16", "int8"])
def test_model_in_hugepages_computes_the_same(tmp_path: Path, monkeypatch, dense: str) -> None:
    write_checkpoint(preset("tiny").replace(vocab_size=2048), tmp_path, seed=3)
    ids = torch.tensor([[1, 5, 9, 200, 7]])
    monkeypatch.setenv("OSSRT_NO_HUGEPAGES", "1")
    plain = load_model(tmp_path, dense_dtype=dense, progress=False)
    want = plain.logits(plain(ids))
    monkeypatch.delenv("OSSRT_NO_HUGEPAGES")
    monkeypatch.setattr(hugepages, "MIN_BYTES", 0)  # the tiny model's tensors move too
    model = load_model(tmp_path, dense_dtype=dense, progress=False)
    files = hugepages.file_mappings()
    weights = [*model.parameters(), *model.buffers()]
    weights += [t for m in model.modules() for w in vars(m).values() if isinstance(w, Q8Weight)
                for t in (w.q, w.scale)]
    assert len(weights) > 20
    for t in weights:
        if t.numel() * t.element_size() >= 4096:
            assert t.data_ptr() % hugepages.HUGE == 0, "a weight was left in the mapping"
            assert not any(a <= t.data_ptr() < b for a, b in files)
    assert torch.equal(model.logits(model(ids)), want)


@needs_thp
def test_weights_that_do_not_fit_stay_mapped(tmp_path: Path, monkeypatch) -> None:
    write_checkpoint(preset("tiny").replace(vocab_size=2048), tmp_path, seed=3)
    monkeypatch.setattr(hugepages, "MIN_BYTES", 0)
    monkeypatch.setattr(hugepages, "available_bytes", lambda: 1 << 14)  # 16 KiB free
    model = load_model(tmp_path, progress=False)
    files = hugepages.file_mappings()
    assert any(a <= model.unembed.data_ptr() < b for a, b in files)
    assert not model.to_hugepages()


def test_available_memory_is_read() -> None:
    assert hugepages.available_bytes() > 1 << 26
