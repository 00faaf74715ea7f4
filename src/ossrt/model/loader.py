"""Reads gpt-oss checkpoints (both layouts), checking every tensor before touching data.

`read_checkpoint` finds the files, reads only the safetensors headers, and compares each tensor's
name, shape and dtype with what the config implies. Every problem is collected into one
`CheckpointError` that names the tensor and the file; nothing is loaded until all is well.
Then tensors come back memory-mapped (safetensors' mmap backend): no copy is made here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from .config import ConfigError, GptOssConfig
from .layout import Layout, TensorSpec, checkpoint_specs, from_checkpoint

_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
              "U8": torch.uint8, "I8": torch.int8, "F64": torch.float64, "I32": torch.int32,
              "I64": torch.int64, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
              "F8_E5M2": torch.float8_e5m2}
_MAX_LISTED = 12


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names each offending tensor and file."""


@dataclass(frozen=True)
class Checkpoint:
    config: GptOssConfig
    layout: Layout
    root: Path  # folder holding the config.json that was read
    weights: dict[str, torch.Tensor]  # internal names (see layout.py), memory-mapped
    files: tuple[Path, ...]


@dataclass(frozen=True, slots=True)
class _Entry:
    file: Path
    shape: tuple[int, ...]
    dtype: str


def resolve_layout(path: str | Path, layout: Layout | None = None) -> tuple[Path, Layout]:
    """The folder and layout to read: Hugging Face at the top, else `original/`."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: no such checkpoint folder")
    has_hf = (root / "config.json").is_file()
    has_orig = (root / "original" / "config.json").is_file()
    if layout is None:
        layout = "hf" if has_hf else "original" if has_orig else None
    if layout == "hf" and has_hf:
        return root, "hf"
    if layout == "original" and has_orig:
        return root / "original", "original"
    what = {"hf": "config.json", "original": "original/config.json", None:
            "config.json (Hugging Face layout) or original/config.json (reference layout)"}
    raise CheckpointError(f"{root}: no {what[layout]} found")


def read_config(root: Path, layout: Layout) -> GptOssConfig:
    text = (root / "config.json").read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{root / 'config.json'}: not valid JSON: {exc}") from exc
    try:
        if layout == "hf":
            return GptOssConfig.from_hf_dict(data)
        return GptOssConfig.from_original_dict(data)
    except (ConfigError, TypeError, ValueError) as exc:  # bad types of values: clear message
        raise CheckpointError(f"{root / 'config.json'}: {exc}") from exc


def _files(root: Path, layout: Layout) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files to read, and the index's weight map if there is one."""
    index_path = root / "model.safetensors.index.json"
    if layout == "hf" and index_path.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index_path}: unreadable index ({exc!r})") from exc
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (root / n).is_file()]
        if missing:
            raise CheckpointError(
                f"{root}: missing shard(s) {', '.join(missing)} named by {index_path.name} "
                f"(holding e.g. {next(k for k, v in weight_map.items() if v == missing[0])})")
        return [root / n for n in names], weight_map
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{root}: no *.safetensors files found")
    return files, None


def _scan(files: list[Path]) -> dict[str, _Entry]:
    """Headers only: tensor name -> where it is, its shape and dtype."""
    entries: dict[str, _Entry] = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    if name in entries:
                        raise CheckpointError(
                            f"tensor {name} appears in both {entries[name].file.name} and {path.name}")
                    entries[name] = _Entry(path, tuple(sl.get_shape()), sl.get_dtype())
        except SafetensorError as exc:
            size = path.stat().st_size
            raise CheckpointError(
                f"{path}: not a readable safetensors file ({exc}); {size} bytes on disk — "
                "truncated or corrupt? Re-download or re-write it") from exc
    return entries


def _check(cfg: GptOssConfig, layout: Layout, entries: dict[str, _Entry],
           weight_map: dict[str, str] | None) -> list[str]:
    specs = checkpoint_specs(cfg, layout)
    problems: list[str] = []
    for name, spec in specs.items():
        e = entries.get(name)
        if e is None:
            where = f" (the index puts it in {weight_map[name]})" if weight_map and name in weight_map else ""
            problems.append(f"missing tensor {name}{where}")
            continue
        problems.extend(_check_one(name, spec, e))
    for name, e in entries.items():
        if name in specs:
            continue
        if name.endswith(("gate_up_proj", "down_proj")) or ".mlp1_weight" in name or ".mlp2_weight" in name:
            problems.append(
                f"expert tensor {name} in {e.file.name} is not MXFP4-packed ({e.dtype}, shape "
                f"{list(e.shape)}): ossrt keeps experts as MXFP4 *_blocks/*_scales, as released")
        else:
            problems.append(f"unexpected tensor {name} in {e.file.name}")
    if weight_map:
        for name, fname in weight_map.items():
            e = entries.get(name)
            if e is not None and e.file.name != fname:
                problems.append(f"index puts {name} in {fname} but it is in {e.file.name}")
    return problems


def _check_one(name: str, spec: TensorSpec, e: _Entry) -> list[str]:
    out = []
    dtype = _ST_DTYPES.get(e.dtype)
    if spec.kind != "dense" and dtype != torch.uint8:
        out.append(f"expert tensor {name} in {e.file.name} is not MXFP4 ({e.dtype}, "
                   "expected U8 blocks/scales)")
    elif dtype not in spec.expected_dtypes():
        out.append(f"tensor {name} in {e.file.name} has dtype {e.dtype}, expected "
                   + "/".join(str(d).removeprefix("torch.") for d in spec.expected_dtypes()))
    if e.shape != spec.shape:
        out.append(f"tensor {name} in {e.file.name} has shape {list(e.shape)}, but the config "
                   f"implies {list(spec.shape)}")
    return out


def read_checkpoint(path: str | Path, layout: Layout | None = None, *,
                    progress: bool | None = None) -> Checkpoint:
    """Validates and memory-maps a checkpoint. `progress=None` shows a bar on a terminal."""
    root, layout = resolve_layout(path, layout)
    cfg = read_config(root, layout)
    files, weight_map = _files(root, layout)
    entries = _scan(files)
    problems = _check(cfg, layout, entries, weight_map)
    if problems:
        shown = problems[:_MAX_LISTED]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise CheckpointError(f"{root}: checkpoint does not match its config.json "
                              f"({len(problems)} problem(s)):\n  " + "\n  ".join(shown) + more)
    tensors: dict[str, torch.Tensor] = {}
    total = sum(e.file.stat().st_size for e in {e.file: e for e in entries.values()}.values())
    disable = None if progress is None else not progress  # None: only on a terminal
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading", disable=disable,
              leave=False) as bar:
        for path_ in files:
            names = [n for n, e in entries.items() if e.file == path_]
            with safe_open(path_, framework="pt") as f:
                for name in names:
                    tensors[name] = f.get_tensor(name)
            bar.update(path_.stat().st_size)
    return Checkpoint(cfg, layout, root, from_checkpoint(cfg, layout, tensors), tuple(files))
