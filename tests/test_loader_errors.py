"""Broken checkpoints fail with one CheckpointError that names the tensor and/or the file.

Each test damages a fresh copy of a small, valid checkpoint the way real downloads and
conversions go wrong, and checks the error before any weight is used. The CLI turns these
errors into exit code 2 and a short message, never a traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save_file

from ossrt.cli import main
from ossrt.model import CheckpointError, load_model, preset, read_checkpoint, write_checkpoint
from ossrt.model.checkpoint import checkpoint_nbytes
from ossrt.model.mxfp4 import dequantize

SMALL = preset("tiny").replace(vocab_size=1024, num_hidden_layers=2)
SHARD = "model-00001-of-00001.safetensors"
BLOCKS = "model.layers.1.mlp.experts.gate_up_proj_blocks"
SCALES = "model.layers.1.mlp.experts.gate_up_proj_scales"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pristine")
    write_checkpoint(SMALL, root / "hf", layout="hf", seed=4)
    write_checkpoint(SMALL, root / "ref", layout="original", seed=4)
    per_layer = checkpoint_nbytes(SMALL, "hf") // (SMALL.num_hidden_layers + 1)
    write_checkpoint(SMALL, root / "sharded", layout="hf", seed=4, max_shard_bytes=per_layer)
    for name in ("hf", "ref", "sharded"):
        read_checkpoint(root / name)  # all valid to begin with
    return root


@pytest.fixture
def ck(pristine, tmp_path) -> Path:
    """A fresh, writable copy of the single-shard Hugging Face checkpoint."""
    return Path(shutil.copytree(pristine / "hf", tmp_path / "ck"))


def _error(path, layout=None) -> str:
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path, layout)
    return str(info.value)


def _rewrite(path: Path, edit) -> None:
    tensors = dict(st_load(path.read_bytes()))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _edit_index(root: Path, edit) -> None:
    p = root / "model.safetensors.index.json"
    index = json.loads(p.read_text())
    edit(index["weight_map"])
    p.write_text(json.dumps(index))


def _edit_config(root: Path, edit) -> None:
    p = root / "config.json"
    d = json.loads(p.read_text())
    edit(d)
    p.write_text(json.dumps(d))


# ---- files -------------------------------------------------------------------------------------

def test_truncated_shard(ck):
    f = ck / SHARD
    data = f.read_bytes()
    f.write_bytes(data[:len(data) // 2])
    msg = _error(ck)
    assert SHARD in msg
    assert "truncated" in msg or "corrupt" in msg


def test_truncated_inside_header(ck):
    (ck / SHARD).write_bytes((ck / SHARD).read_bytes()[:100])
    assert SHARD in _error(ck)


def test_truncated_original_layout(pristine, tmp_path):
    root = Path(shutil.copytree(pristine / "ref", tmp_path / "ref"))
    f = root / "original" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
    assert "model.safetensors" in _error(root)


def test_missing_shard_named_in_index(pristine, tmp_path):
    root = Path(shutil.copytree(pristine / "sharded", tmp_path / "sharded"))
    shards = sorted(root.glob("*.safetensors"))
    assert len(shards) >= 2
    gone = shards[1].name
    shards[1].unlink()
    msg = _error(root)
    assert gone in msg
    assert "index" in msg


def test_no_safetensors_at_all(ck):
    (ck / SHARD).unlink()
    (ck / "model.safetensors.index.json").unlink()
    assert "safetensors" in _error(ck)


def test_invalid_json_config(ck):
    (ck / "config.json").write_text('{"hidden_size": 64,')
    msg = _error(ck)
    assert "config.json" in msg and "JSON" in msg


@pytest.mark.parametrize("text", ["[1, 2, 3]", '"gpt_oss"'])
def test_config_that_is_not_an_object(ck, text):
    (ck / "config.json").write_text(text)
    assert "config.json" in _error(ck)


def test_config_with_malformed_section(ck):
    _edit_config(ck, lambda d: d.update(quantization_config="mxfp4"))
    assert "config.json" in _error(ck)


def test_config_missing_field(ck):
    _edit_config(ck, lambda d: d.pop("num_attention_heads"))
    msg = _error(ck)
    assert "config.json" in msg and "num_attention_heads" in msg


def test_unreadable_index(ck):
    (ck / "model.safetensors.index.json").write_text("{}")
    assert "model.safetensors.index.json" in _error(ck)


def test_folder_without_config(ck):
    (ck / "config.json").unlink()
    msg = _error(ck)
    assert str(ck) in msg and "config.json" in msg


def test_original_layout_asked_for_but_absent(ck):
    assert "original/config.json" in _error(ck, "original")


def test_not_a_folder(tmp_path):
    msg = _error(tmp_path / "nope")
    assert "nope" in msg


# ---- config vs tensors --------------------------------------------------------------------------

def test_config_hidden_size_does_not_match(ck):
    _edit_config(ck, lambda d: d.update(hidden_size=96))
    msg = _error(ck)
    assert "model.embed_tokens.weight" in msg
    assert SHARD in msg
    assert "[1024, 64]" in msg and "[1024, 96]" in msg


def test_config_expert_count_does_not_match(ck):
    _edit_config(ck, lambda d: d.update(num_local_experts=4, num_experts_per_tok=2))
    msg = _error(ck)
    assert "mlp.router.weight" in msg or "gate_up_proj_blocks" in msg
    assert "shape" in msg


def test_original_config_does_not_match(pristine, tmp_path):
    root = Path(shutil.copytree(pristine / "ref", tmp_path / "ref"))
    p = root / "original" / "config.json"
    d = json.loads(p.read_text())
    d["num_attention_heads"] = 8
    p.write_text(json.dumps(d))
    msg = _error(root)
    assert "block.0.attn.qkv.weight" in msg


def test_many_problems_are_summarised(ck):
    _edit_config(ck, lambda d: d.update(hidden_size=128))
    msg = _error(ck)
    assert "problem" in msg
    assert "more" in msg  # the list is capped, not hundreds of lines
    assert len(msg.splitlines()) < 20


# ---- tensors -------------------------------------------------------------------------------------

def test_expert_blocks_stored_as_bf16(ck):
    def edit(t):
        t[BLOCKS] = torch.zeros(t[BLOCKS].shape, dtype=torch.bfloat16)
    _rewrite(ck / SHARD, edit)
    msg = _error(ck)
    assert BLOCKS in msg
    assert "MXFP4" in msg
    assert SHARD in msg


def test_dequantized_experts_instead_of_blocks(ck):
    """A bf16 conversion: `gate_up_proj` [E, H, 2I] replaces gate_up_proj_{blocks,scales}."""
    dense = "model.layers.1.mlp.experts.gate_up_proj"

    def edit(t):
        w = dequantize(t.pop(BLOCKS), t.pop(SCALES), torch.bfloat16)  # [E, 2I, H]
        t[dense] = w.transpose(1, 2).contiguous()

    def edit_index(wm):
        wm.pop(BLOCKS)
        wm.pop(SCALES)
        wm[dense] = SHARD

    _rewrite(ck / SHARD, edit)
    _edit_index(ck, edit_index)
    msg = _error(ck)
    assert dense + " " in msg or dense + "\n" in msg or f"{dense} in" in msg
    assert "MXFP4" in msg
    assert BLOCKS in msg  # and the missing packed tensors are named too


def test_dequantized_experts_original_layout(pristine, tmp_path):
    root = Path(shutil.copytree(pristine / "ref", tmp_path / "ref"))

    def edit(t):
        b, s = t.pop("block.0.mlp.mlp1_weight.blocks"), t.pop("block.0.mlp.mlp1_weight.scales")
        t["block.0.mlp.mlp1_weight"] = dequantize(b, s, torch.bfloat16)

    _rewrite(root / "original" / "model.safetensors", edit)
    msg = _error(root)
    assert "block.0.mlp.mlp1_weight " in msg or "block.0.mlp.mlp1_weight in" in msg
    assert "MXFP4" in msg


def test_scales_with_wrong_dtype(ck):
    def edit(t):
        t[SCALES] = t[SCALES].to(torch.float32)
    _rewrite(ck / SHARD, edit)
    msg = _error(ck)
    assert SCALES in msg


def test_dense_weight_with_integer_dtype(ck):
    name = "model.layers.0.self_attn.q_proj.weight"

    def edit(t):
        t[name] = t[name].to(torch.int32)
    _rewrite(ck / SHARD, edit)
    msg = _error(ck)
    assert name in msg and "I32" in msg


def test_missing_tensor(ck):
    name = "model.layers.0.self_attn.sinks"
    _rewrite(ck / SHARD, lambda t: t.pop(name))
    msg = _error(ck)
    assert f"missing tensor {name}" in msg


def test_missing_tensor_also_gone_from_index(ck):
    name = "lm_head.weight"
    _rewrite(ck / SHARD, lambda t: t.pop(name))
    _edit_index(ck, lambda wm: wm.pop(name))
    assert name in _error(ck)


def test_unexpected_extra_tensor(ck):
    name = "model.layers.0.self_attn.rotary_emb.inv_freq"
    _rewrite(ck / SHARD, lambda t: t.update({name: torch.ones(8)}))
    msg = _error(ck)
    assert name in msg and SHARD in msg
    assert "unexpected" in msg


def test_index_points_to_wrong_shard(pristine, tmp_path):
    root = Path(shutil.copytree(pristine / "sharded", tmp_path / "sharded"))
    shards = sorted(p.name for p in root.glob("*.safetensors"))
    _edit_index(root, lambda wm: wm.update({"lm_head.weight": shards[-1]}))
    msg = _error(root)
    assert "lm_head.weight" in msg


def test_tensor_in_two_shards(pristine, tmp_path):
    root = Path(shutil.copytree(pristine / "sharded", tmp_path / "sharded"))
    shards = sorted(root.glob("*.safetensors"))
    _rewrite(shards[-1], lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.bfloat16)}))
    msg = _error(root)
    assert "model.norm.weight" in msg


def test_load_model_raises_the_same_error(ck):
    (ck / SHARD).write_bytes((ck / SHARD).read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=SHARD):
        load_model(ck)


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


# ---- CLI -------------------------------------------------------------------------------------------

def _cli_error(capsys, argv) -> str:
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2
    assert "Traceback" not in err and "Traceback" not in out
    assert err.startswith(f"ossrt {argv[0]}: error: ")
    return err


def test_cli_generate_missing_model(capsys, tmp_path):
    err = _cli_error(capsys, ["generate", "--model", str(tmp_path / "BAD"), "--prompt", "hi",
                              "--max-tokens", "2"])
    assert len(err.strip().splitlines()) == 1
    assert "BAD" in err


def test_cli_generate_folder_without_config(capsys, tmp_path):
    err = _cli_error(capsys, ["generate", "--model", str(tmp_path), "--prompt", "hi"])
    assert len(err.strip().splitlines()) == 1
    assert "config.json" in err


def test_cli_generate_truncated_checkpoint(capsys, ck):
    (ck / SHARD).write_bytes((ck / SHARD).read_bytes()[:5000])
    err = _cli_error(capsys, ["generate", "--model", str(ck), "--prompt", "hi"])
    assert len(err.strip().splitlines()) == 1
    assert SHARD in err


def test_cli_generate_mismatched_checkpoint(capsys, ck):
    _edit_config(ck, lambda d: d.update(num_local_experts=4, num_experts_per_tok=2))
    err = _cli_error(capsys, ["generate", "--model", str(ck), "--prompt", "hi"])
    assert "mlp.router.weight" in err or "gate_up_proj" in err


def test_cli_info_bad_config(capsys, ck):
    (ck / "config.json").write_text("{")
    err = _cli_error(capsys, ["info", "--model", str(ck)])
    assert len(err.strip().splitlines()) == 1


def test_cli_console_script_bad_model(tmp_path):
    exe = Path(sys.executable).with_name("ossrt")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "ossrt.cli"]
    env = dict(os.environ, OSSRT_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([*cmd, "generate", "--model", str(tmp_path / "BAD"), "--prompt", "hi"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ossrt generate: error: ") and "BAD" in lines[0]
    assert r.stdout == ""


def test_cli_info_config_not_an_object(capsys, ck):
    (ck / "config.json").write_text("[]")
    err = _cli_error(capsys, ["info", "--model", str(ck)])
    assert "config.json" in err
