"""Random checkpoints: determinism, both released layouts (SPEC.md 3), sharding, exact reload.

File contents are checked by parsing the safetensors headers here (8-byte little-endian length,
then JSON), independently of ossrt's reader and of the safetensors library.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ossrt.model import load_model, preset, random_weights, read_checkpoint, write_checkpoint
from ossrt.model.checkpoint import checkpoint_nbytes

# 2I != H and I != H, so a swapped dimension cannot go unnoticed.
SMALL = preset("tiny").replace(vocab_size=1024, intermediate_size=96, num_hidden_layers=3)
ST_DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "U8": 1}


pytestmark = pytest.mark.usefixtures("one_thread")


def _header(path: Path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    h = json.loads(raw[8:8 + n])
    h.pop("__metadata__", None)
    return h


def _data_size(path: Path) -> int:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return path.stat().st_size - 8 - n


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.uint8:
        return torch.equal(a, b)
    view = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[a.dtype]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


def _expected_hf(cfg) -> dict[str, tuple[list[int], str]]:
    """SPEC.md section 3, written out for a config: name -> (shape, safetensors dtype)."""
    H, I, E, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.vocab_size
    Q, KV, NH = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, cfg.num_attention_heads
    out = {"model.embed_tokens.weight": ([V, H], "BF16"), "lm_head.weight": ([V, H], "BF16"),
           "model.norm.weight": ([H], "BF16")}
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        out.update({
            p + "input_layernorm.weight": ([H], "BF16"),
            p + "post_attention_layernorm.weight": ([H], "BF16"),
            p + "self_attn.q_proj.weight": ([Q, H], "BF16"), p + "self_attn.q_proj.bias": ([Q], "BF16"),
            p + "self_attn.k_proj.weight": ([KV, H], "BF16"), p + "self_attn.k_proj.bias": ([KV], "BF16"),
            p + "self_attn.v_proj.weight": ([KV, H], "BF16"), p + "self_attn.v_proj.bias": ([KV], "BF16"),
            p + "self_attn.o_proj.weight": ([H, Q], "BF16"), p + "self_attn.o_proj.bias": ([H], "BF16"),
            p + "self_attn.sinks": ([NH], "BF16"),
            p + "mlp.router.weight": ([E, H], "BF16"), p + "mlp.router.bias": ([E], "BF16"),
            p + "mlp.experts.gate_up_proj_blocks": ([E, 2 * I, H // 32, 16], "U8"),
            p + "mlp.experts.gate_up_proj_scales": ([E, 2 * I, H // 32], "U8"),
            p + "mlp.experts.gate_up_proj_bias": ([E, 2 * I], "BF16"),
            p + "mlp.experts.down_proj_blocks": ([E, H, I // 32, 16], "U8"),
            p + "mlp.experts.down_proj_scales": ([E, H, I // 32], "U8"),
            p + "mlp.experts.down_proj_bias": ([E, H], "BF16"),
        })
    return out


def _expected_original(cfg) -> dict[str, tuple[list[int], str]]:
    H, I, E, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.vocab_size
    Q, KV, NH = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, cfg.num_attention_heads
    out = {"embedding.weight": ([V, H], "BF16"), "unembedding.weight": ([V, H], "BF16"),
           "norm.scale": ([H], "BF16")}
    for n in range(cfg.num_hidden_layers):
        p = f"block.{n}."
        out.update({
            p + "attn.norm.scale": ([H], "BF16"),
            p + "attn.qkv.weight": ([Q + 2 * KV, H], "BF16"), p + "attn.qkv.bias": ([Q + 2 * KV], "BF16"),
            p + "attn.sinks": ([NH], "BF16"),
            p + "attn.out.weight": ([H, Q], "BF16"), p + "attn.out.bias": ([H], "BF16"),
            p + "mlp.norm.scale": ([H], "BF16"),
            p + "mlp.gate.weight": ([E, H], "BF16"), p + "mlp.gate.bias": ([E], "BF16"),
            p + "mlp.mlp1_weight.blocks": ([E, 2 * I, H // 32, 16], "U8"),
            p + "mlp.mlp1_weight.scales": ([E, 2 * I, H // 32], "U8"),
            p + "mlp.mlp1_bias": ([E, 2 * I], "BF16"),
            p + "mlp.mlp2_weight.blocks": ([E, H, I // 32, 16], "U8"),
            p + "mlp.mlp2_weight.scales": ([E, H, I // 32], "U8"),
            p + "mlp.mlp2_bias": ([E, H], "BF16"),
        })
    return out


@pytest.fixture(scope="module")
def both(tmp_path_factory) -> Path:
    """SMALL, seed 5, both layouts in one folder (as `make-checkpoint --layout both` writes)."""
    out = tmp_path_factory.mktemp("both")
    assert write_checkpoint(SMALL, out, layout="hf", seed=5) == out
    assert write_checkpoint(SMALL, out, layout="original", seed=5) == out / "original"
    return out


# ---- determinism -----------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["hf", "original"])
def test_same_seed_same_bytes_different_seed_different_bytes(tmp_path, layout):
    a = _hashes(write_checkpoint(SMALL, tmp_path / "a", layout=layout, seed=1))
    b = _hashes(write_checkpoint(SMALL, tmp_path / "b", layout=layout, seed=1))
    c = _hashes(write_checkpoint(SMALL, tmp_path / "c", layout=layout, seed=2))
    assert a == b
    assert a.keys() == c.keys()
    tensor_files = [k for k in a if k.endswith(".safetensors")]
    assert tensor_files
    for k in tensor_files:
        assert a[k] != c[k], k
    assert a["config.json"] == c["config.json"]  # the config does not depend on the seed


def test_random_weights_depend_on_seed():
    w1, w2 = random_weights(SMALL, 1), random_weights(SMALL, 2)
    for k in ("embed", "layers.0.q_w", "layers.2.w1_blocks", "layers.1.sinks"):
        assert not torch.equal(w1[k], w2[k]), k


def test_random_weights_differ_per_tensor():
    w1 = random_weights(SMALL, 1)
    # Tensors of the same shape in one model are not copies of each other.
    assert not torch.equal(w1["layers.0.q_w"], w1["layers.1.q_w"])
    assert not torch.equal(w1["embed"], w1["unembed"])
    assert all(torch.isfinite(t.float()).all() for k, t in w1.items() if t.dtype != torch.uint8)
    # Scales are plausible E8M0 exponents (finite, far from the 0 / 255 ends).
    s = w1["layers.0.w1_scales"]
    assert 100 < int(s.min()) and int(s.max()) < 140


# ---- Hugging Face layout ---------------------------------------------------------------------

def test_hf_layout_files_and_config(both):
    cfg_json = json.loads((both / "config.json").read_text())
    assert cfg_json["quantization_config"]["quant_method"] == "mxfp4"
    assert cfg_json["model_type"] == "gpt_oss"
    assert cfg_json["hidden_size"] == SMALL.hidden_size
    assert cfg_json["num_local_experts"] == SMALL.num_local_experts
    shards = sorted(p.name for p in both.glob("*.safetensors"))
    assert shards == ["model-00001-of-00001.safetensors"]


def test_hf_layout_names_shapes_dtypes(both):
    index = json.loads((both / "model.safetensors.index.json").read_text())
    headers = {}
    for shard in set(index["weight_map"].values()):
        for name, info in _header(both / shard).items():
            headers[name] = (info["shape"], info["dtype"], shard)
    expected = _expected_hf(SMALL)
    assert set(headers) == set(expected)
    assert set(index["weight_map"]) == set(expected)
    for name, (shape, dtype) in expected.items():
        assert headers[name][:2] == (shape, dtype), name
        assert index["weight_map"][name] == headers[name][2]


def test_hf_index_total_size(both):
    index = json.loads((both / "model.safetensors.index.json").read_text())
    expected = sum(
        ST_DTYPE_BYTES[dt] * int(torch.tensor(shape).prod()) for shape, dt in _expected_hf(SMALL).values())
    assert index["metadata"]["total_size"] == expected
    assert checkpoint_nbytes(SMALL, "hf") == expected
    assert sum(_data_size(both / s) for s in set(index["weight_map"].values())) == expected


# ---- reference layout ------------------------------------------------------------------------

def test_original_layout_names_shapes_dtypes(both):
    root = both / "original"
    assert sorted(p.name for p in root.iterdir()) == ["config.json", "model.safetensors"]
    cfg_json = json.loads((root / "config.json").read_text())
    assert cfg_json["num_experts"] == SMALL.num_local_experts
    header = _header(root / "model.safetensors")
    expected = _expected_original(SMALL)
    assert set(header) == set(expected)
    for name, (shape, dtype) in expected.items():
        assert (header[name]["shape"], header[name]["dtype"]) == (shape, dtype), name


def test_original_qkv_is_q_k_v_concatenated(both):
    with safe_open(both / "model-00001-of-00001.safetensors", "pt") as hf, \
            safe_open(both / "original" / "model.safetensors", "pt") as ref:
        for n in range(SMALL.num_hidden_layers):
            for part in ("weight", "bias"):
                qkv = ref.get_tensor(f"block.{n}.attn.qkv.{part}")
                parts = [hf.get_tensor(f"model.layers.{n}.self_attn.{x}_proj.{part}") for x in "qkv"]
                assert qkv.shape[0] == SMALL.q_dim + 2 * SMALL.kv_dim
                assert _bits_equal(qkv, torch.cat(parts))
        # Everything else is the same bytes under another name.
        assert _bits_equal(ref.get_tensor("block.1.mlp.mlp1_weight.blocks"),
                           hf.get_tensor("model.layers.1.mlp.experts.gate_up_proj_blocks"))
        assert _bits_equal(ref.get_tensor("embedding.weight"), hf.get_tensor("model.embed_tokens.weight"))


# ---- sharding --------------------------------------------------------------------------------

def test_sharding(tmp_path, both):
    layer_bytes = checkpoint_nbytes(SMALL, "hf") // (SMALL.num_hidden_layers + 1)
    root = write_checkpoint(SMALL, tmp_path, layout="hf", seed=5, max_shard_bytes=layer_bytes)
    shards = sorted(p.name for p in root.glob("*.safetensors"))
    n = len(shards)
    assert n >= 3
    assert shards == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert not list(root.glob("*.partial"))
    index = json.loads((root / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    seen = {}
    for s in shards:
        for name in _header(root / s):
            assert name not in seen, f"{name} in {seen.get(name)} and {s}"
            seen[name] = s
    assert seen == index["weight_map"]
    # A layer's tensors are never split across shards.
    for n_layer in range(SMALL.num_hidden_layers):
        files = {f for k, f in seen.items() if k.startswith(f"model.layers.{n_layer}.")}
        assert len(files) == 1
    # Loads, and holds the same weights as the single-file checkpoint of the same seed.
    sharded = read_checkpoint(root)
    single = read_checkpoint(both, "hf")
    assert len(sharded.files) == n
    assert sharded.weights.keys() == single.weights.keys()
    for k in single.weights:
        assert _bits_equal(sharded.weights[k], single.weights[k]), k


# ---- writer -> loader ------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["hf", "original"])
def test_round_trip_is_exact(both, layout):
    ck = read_checkpoint(both, layout)
    assert ck.layout == layout
    assert ck.config == SMALL
    expected = random_weights(SMALL, 5)
    assert ck.weights.keys() == expected.keys()
    for k, t in expected.items():
        assert _bits_equal(ck.weights[k], t), k


def test_layout_autodetect_prefers_hf(both, tmp_path):
    assert read_checkpoint(both).layout == "hf"
    only_orig = write_checkpoint(SMALL, tmp_path, layout="original", seed=5)
    assert only_orig == tmp_path / "original"
    assert read_checkpoint(tmp_path).layout == "original"


def test_both_layouts_give_identical_logits(both):
    ids = torch.tensor([[1, 5, 900, 17, 3, 3, 1000, 42]])
    out = []
    for layout in ("hf", "original"):
        m = load_model(both, "float32", layout=layout)
        assert m.dtype == torch.float32
        out.append(m.logits(m(ids)))
    assert out[0].shape == (1, 8, SMALL.vocab_size)
    assert torch.isfinite(out[0]).all()
    assert torch.equal(out[0], out[1])
    assert out[0].std() > 0


def test_different_seed_gives_different_logits(both, tmp_path):
    write_checkpoint(SMALL, tmp_path, layout="hf", seed=6)
    ids = torch.tensor([[1, 2, 3]])
    a, b = load_model(both, "float32"), load_model(tmp_path, "float32")
    assert not torch.equal(a.logits(a(ids)), b.logits(b(ids)))


# ---- memory: experts stay packed, bf16 weights stay memory-mapped ----------------------------

def _file_mappings(path: Path) -> list[tuple[int, int]]:
    target = str(path.resolve())
    spans = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == target:
                a, b = (int(x, 16) for x in fields[0].split("-"))
                spans.append((a, b))
    return spans


def _in_mapping(t: torch.Tensor, spans) -> bool:
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    return any(a <= start and end <= b for a, b in spans)


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_experts_stay_uint8_and_bf16_weights_are_mapped(both, layout):
    if not Path("/proc/self/maps").exists():
        pytest.skip("needs /proc/self/maps (Linux)")
    m = load_model(both, "bfloat16", layout=layout)
    shard = (both / "model-00001-of-00001.safetensors" if layout == "hf"
             else both / "original" / "model.safetensors")
    spans = _file_mappings(shard)
    assert spans, f"{shard} is not memory-mapped at all"

    E, H, I = SMALL.num_local_experts, SMALL.hidden_size, SMALL.intermediate_size
    for blk in m.blocks:
        assert blk.w1_blocks.dtype == torch.uint8 and blk.w1_blocks.shape == (E, 2 * I, H // 32, 16)
        assert blk.w2_blocks.dtype == torch.uint8 and blk.w2_blocks.shape == (E, H, I // 32, 16)
        assert blk.w1_scales.dtype == torch.uint8 and blk.w2_scales.dtype == torch.uint8
        assert _in_mapping(blk.w1_blocks, spans) and _in_mapping(blk.w2_scales, spans)
        assert _in_mapping(blk.q_w, spans) and _in_mapping(blk.router_w, spans)
    # No dequantized expert copy anywhere: no float tensor has an expert weight's size.
    expert_sizes = {E * 2 * I * H, E * H * I}
    for name, t in list(m.named_parameters()) + list(m.named_buffers()):
        if t.is_floating_point():
            assert t.numel() not in expert_sizes, name
    # Dense bf16 weights are views of the mapping, not copies.
    assert m.embed.dtype == torch.bfloat16
    assert _in_mapping(m.embed, spans)
    assert _in_mapping(m.unembed, spans)
    # The model's own memory beyond the mapping is small: nearly every byte is mapped.
    unmapped = sum(t.numel() * t.element_size()
                   for _, t in list(m.named_parameters()) + list(m.named_buffers())
                   if not _in_mapping(t, spans))
    assert unmapped < 0.05 * checkpoint_nbytes(SMALL, layout)


def test_float32_load_converts_dense_but_not_experts(both):
    m = load_model(both, "float32")
    assert m.embed.dtype == torch.float32 and m.blocks[0].q_w.dtype == torch.float32
    assert m.blocks[0].w1_blocks.dtype == torch.uint8
