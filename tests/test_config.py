"""GptOssConfig: presets, both config.json dialects, validation, derived numbers (SPEC.md 1-3)."""

from __future__ import annotations

import json
import math

import pytest

from ossrt.model import ConfigError, GptOssConfig, preset
from ossrt.model.config import PRESETS, yarn_low_high
from ossrt.model.layout import internal_specs

SLIDING, FULL = "sliding_attention", "full_attention"


def _alternating(n):
    return tuple(SLIDING if i % 2 == 0 else FULL for i in range(n))


# ---- presets ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name,layers,experts", [("20b", 24, 32), ("120b", 36, 128)])
def test_released_presets_match_spec(name, layers, experts):
    c = preset(name)
    assert c.num_hidden_layers == layers
    assert c.num_local_experts == experts
    assert c.num_experts_per_tok == 4
    assert c.hidden_size == 2880 and c.intermediate_size == 2880
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (64, 8, 64)
    assert c.vocab_size == 201088
    assert c.sliding_window == 128
    assert c.layer_types == _alternating(layers)
    assert c.layer_types[0] == SLIDING
    assert c.rope_theta == 150000.0
    assert (c.rope_scaling_factor, c.rope_beta_fast, c.rope_beta_slow) == (32.0, 32.0, 1.0)
    assert c.original_max_position_embeddings == 4096
    assert c.max_position_embeddings == 131072
    assert c.swiglu_limit == 7.0 and c.rms_norm_eps == 1e-5
    # Derived shapes of SPEC section 3: q [4096, 2880], k/v [512, 2880].
    assert c.q_dim == 4096 and c.kv_dim == 512
    assert c.window(0) == 128 and c.window(1) is None


def test_tiny_preset_keeps_every_feature():
    c = preset("tiny")
    assert c.num_experts_per_tok > 1
    assert c.num_local_experts > c.num_experts_per_tok
    assert c.sliding_window == 16
    assert c.num_attention_heads > c.num_key_value_heads > 0  # GQA
    assert c.max_position_embeddings == 131072
    assert c.rope_scaling_factor == 32.0 and c.original_max_position_embeddings == 4096
    assert c.rope_theta == 150000.0
    assert c.layer_types == _alternating(c.num_hidden_layers)
    assert SLIDING in c.layer_types and FULL in c.layer_types
    assert [c.window(i) for i in range(c.num_hidden_layers)] == [
        16 if i % 2 == 0 else None for i in range(c.num_hidden_layers)]
    # Sinks: one per query head per layer.
    specs = internal_specs(c)
    assert specs["layers.0.sinks"].shape == (c.num_attention_heads,)
    # The real tokenizer's vocabulary.
    assert c.vocab_size == 201088


def test_unknown_preset():
    with pytest.raises(ConfigError, match="tiny"):
        preset("7b")


def test_presets_are_distinct_objects_with_own_layer_types():
    assert len({id(c) for c in PRESETS.values()}) == len(PRESETS)
    assert set(PRESETS) >= {"20b", "120b", "tiny"}


# ---- parameter counts --------------------------------------------------------------------------

def _independent_count(cfg: GptOssConfig) -> tuple[int, int]:
    """(embeddings, blocks) counted from the tensor shapes: 2 parameters per MXFP4 byte."""
    emb = blocks = 0
    for name, spec in internal_specs(cfg).items():
        if spec.kind == "scales":
            continue
        n = math.prod(spec.shape) * (2 if spec.kind == "blocks" else 1)
        if name.startswith("layers."):
            blocks += n
        else:
            emb += n
    return emb, blocks


@pytest.mark.parametrize("name", ["tiny", "20b", "120b"])
def test_num_parameters_matches_tensor_shapes(name):
    c = preset(name)
    p = c.num_parameters()
    emb, blocks = _independent_count(c)
    assert p["embeddings"] == emb
    assert p["blocks"] == blocks
    assert p["total"] == emb + blocks


def test_tiny_blocks_are_a_few_hundred_thousand_parameters():
    blocks = preset("tiny").num_parameters()["blocks"]
    assert 200_000 <= blocks <= 900_000, blocks


@pytest.mark.parametrize("name,total", [("20b", 20.91e9), ("120b", 116.83e9)])
def test_total_parameters_match_model_card(name, total):
    assert preset(name).num_parameters()["total"] == pytest.approx(total, rel=2e-3)


# OpenAI's model card counts the unembedding but not the embedding (a row lookup) as active.
@pytest.mark.parametrize("name,active", [("20b", 3.61e9), ("120b", 5.13e9)])
def test_active_parameters_match_model_card(name, active):
    assert preset(name).num_parameters()["active"] == pytest.approx(active, rel=1e-2)


def test_active_parameters_count_top_k_experts_only():
    c = preset("20b")
    p = c.num_parameters()
    h, i = c.hidden_size, c.intermediate_size
    expert = h * 2 * i + 2 * i + i * h + h
    idle = c.num_hidden_layers * (c.num_local_experts - c.num_experts_per_tok) * expert
    embedding_lookup = c.vocab_size * h
    assert p["total"] - p["active"] == idle + embedding_lookup


# ---- YaRN --------------------------------------------------------------------------------------

def test_yarn_low_high_for_20b_follow_spec_formula():
    low, high = yarn_low_high(preset("20b"))
    theta = 150000.0
    exp_low = 32 * math.log(4096 / (32 * 2 * math.pi)) / math.log(theta)
    exp_high = 32 * math.log(4096 / (1 * 2 * math.pi)) / math.log(theta)
    assert low == pytest.approx(exp_low, rel=1e-12, abs=0)
    assert high == pytest.approx(exp_high, rel=1e-12, abs=0)
    # Unrounded (SPEC: "no rounding"), and a sane range of rotary indices.
    assert low != round(low) and high != round(high)
    assert 0 < low < high < 32


def test_yarn_low_high_depend_on_config():
    c = preset("tiny").replace(rope_theta=10000.0, rope_beta_fast=16.0, rope_beta_slow=2.0,
                               original_max_position_embeddings=2048)
    low, high = yarn_low_high(c)
    d = c.head_dim
    assert low == pytest.approx(d / 2 * math.log(2048 / (16 * 2 * math.pi)) / math.log(10000.0))
    assert high == pytest.approx(d / 2 * math.log(2048 / (2 * 2 * math.pi)) / math.log(10000.0))


# ---- config.json dialects ------------------------------------------------------------------------

def _unusual(swiglu_alpha: float = 1.702) -> GptOssConfig:
    """Every field off its default , to catch a dropped field."""
    return GptOssConfig(
        num_hidden_layers=3, num_local_experts=6, num_experts_per_tok=3, vocab_size=1000,
        hidden_size=96, intermediate_size=160, head_dim=24, num_attention_heads=6,
        num_key_value_heads=3, sliding_window=7, layer_types=(FULL, FULL, SLIDING),
        rope_theta=12345.0, rope_scaling_factor=8.0, rope_beta_fast=16.0, rope_beta_slow=2.0,
        original_max_position_embeddings=1024, max_position_embeddings=9000,
        swiglu_limit=5.5, swiglu_alpha=swiglu_alpha, rms_norm_eps=1e-6, eos_token_id=7, pad_token_id=8)


@pytest.mark.parametrize("cfg", [preset("20b"), preset("120b"), preset("tiny"), _unusual()],
                         ids=["20b", "120b", "tiny", "unusual"])
def test_hf_dict_round_trip(cfg):
    d = cfg.to_hf_dict()
    d = json.loads(json.dumps(d))  # through JSON, as on disk
    assert GptOssConfig.from_hf_dict(d) == cfg


def test_hf_dict_round_trip_keeps_swiglu_alpha():
    # transformers' GptOssConfig writes swiglu_alpha; a round trip must not reset it to 1.702.
    cfg = _unusual(swiglu_alpha=1.5)
    assert GptOssConfig.from_hf_dict(cfg.to_hf_dict()).swiglu_alpha == 1.5


def test_hf_dict_has_released_fields():
    d = preset("20b").to_hf_dict()
    assert d["model_type"] == "gpt_oss"
    assert d["architectures"] == ["GptOssForCausalLM"]
    assert d["quantization_config"]["quant_method"] == "mxfp4"
    assert "modules_to_not_convert" in d["quantization_config"]
    assert d["rope_scaling"]["rope_type"] == "yarn"
    assert d["rope_scaling"]["factor"] == 32.0
    assert d["tie_word_embeddings"] is False
    assert d["attention_bias"] is True
    assert d["num_local_experts"] == 32 and d["experts_per_token"] == 4


@pytest.mark.parametrize("cfg", [preset("20b"), preset("120b"), preset("tiny")],
                         ids=["20b", "120b", "tiny"])
def test_original_dict_round_trip(cfg):
    d = json.loads(json.dumps(cfg.to_original_dict()))
    assert "num_experts" in d and "num_local_experts" not in d
    assert GptOssConfig.from_original_dict(d) == cfg


def test_original_dict_round_trip_non_default_values():
    cfg = _unusual().replace(layer_types=_alternating(3), max_position_embeddings=1024 * 8)
    # The reference config.json has no eps / token-id fields: they take the released values.
    assert GptOssConfig.from_original_dict(cfg.to_original_dict()) == cfg.replace(
        rms_norm_eps=1e-5, eos_token_id=200002, pad_token_id=199999)


def test_original_dict_cannot_express_custom_layer_types():
    with pytest.raises(ConfigError, match="alternating"):
        _unusual().to_original_dict()


def test_rope_parameters_form_is_read():
    """transformers >= 5 writes `rope_parameters` (rope_theta inside) instead of `rope_scaling`."""
    cfg = _unusual()
    d = cfg.to_hf_dict()
    rope = d.pop("rope_scaling")
    rope["rope_theta"] = d.pop("rope_theta")
    d["rope_parameters"] = rope
    assert GptOssConfig.from_hf_dict(d) == cfg


def test_transformers_written_config_is_read():
    tf = pytest.importorskip("transformers")
    cfg = _unusual()
    tf_dict = tf.GptOssConfig(**cfg.to_hf_dict()).to_dict()
    assert GptOssConfig.from_hf_dict(json.loads(json.dumps(tf_dict, default=str))) == cfg


def test_missing_optional_fields_take_released_values():
    c = preset("20b")
    d = {k: c.to_hf_dict()[k] for k in ("num_hidden_layers", "num_local_experts", "vocab_size",
                                        "hidden_size", "intermediate_size",
                                        "num_attention_heads", "num_key_value_heads")}
    assert GptOssConfig.from_hf_dict(d) == c


# ---- validation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("changes,fragment", [
    ({"hidden_size": 100}, "hidden_size"),
    ({"intermediate_size": 48}, "intermediate_size"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ({"num_attention_heads": 5}, "num_key_value_heads"),
    ({"head_dim": 15}, "head_dim"),
    ({"num_local_experts": 0}, "num_local_experts"),
    ({"vocab_size": -1}, "vocab_size"),
    ({"layer_types": (SLIDING,)}, "layer_types"),
    ({"layer_types": (SLIDING, "global", SLIDING, FULL)}, "global"),
])
def test_invalid_config_raises_config_error(changes, fragment):
    with pytest.raises(ConfigError, match=fragment):
        preset("tiny").replace(**changes)


def test_config_error_lists_every_problem():
    with pytest.raises(ConfigError) as info:
        preset("tiny").replace(hidden_size=100, head_dim=15)
    assert "hidden_size" in str(info.value) and "head_dim" in str(info.value)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("edit,fragment", [
    (lambda d: d.pop("hidden_size"), "hidden_size"),
    (lambda d: d.pop("num_local_experts"), "num_local_experts"),
    (lambda d: d.update(model_type="llama"), "llama"),
    (lambda d: d["rope_scaling"].update(rope_type="linear"), "linear"),
    (lambda d: d["rope_scaling"].update(truncate=True), "truncate"),
    (lambda d: d["quantization_config"].update(quant_method="fp8"), "fp8"),
    (lambda d: d.update(hidden_size=2881), "hidden_size"),
])
def test_invalid_hf_dict_raises_config_error(edit, fragment):
    d = preset("tiny").to_hf_dict()
    edit(d)
    with pytest.raises(ConfigError, match=fragment):
        GptOssConfig.from_hf_dict(d)


def test_invalid_original_dict_raises_config_error():
    d = preset("tiny").to_original_dict()
    d.pop("num_experts")
    with pytest.raises(ConfigError, match="num_experts"):
        GptOssConfig.from_original_dict(d)


# ---- files -----------------------------------------------------------------------------------------

def test_from_checkpoint_dir_finds_either_layout(tmp_path):
    c = _unusual()
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(c.to_hf_dict()))
    assert GptOssConfig.from_checkpoint_dir(tmp_path / "hf") == (c, "hf")

    c2 = preset("tiny")
    (tmp_path / "ref" / "original").mkdir(parents=True)
    (tmp_path / "ref" / "original" / "config.json").write_text(json.dumps(c2.to_original_dict()))
    assert GptOssConfig.from_checkpoint_dir(tmp_path / "ref") == (c2, "original")


def test_from_checkpoint_dir_errors(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        GptOssConfig.from_checkpoint_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        GptOssConfig.from_checkpoint_dir(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        GptOssConfig.from_checkpoint_dir(tmp_path)


def test_replace_keeps_layer_types_consistent():
    c = preset("tiny").replace(num_hidden_layers=5)
    assert c.layer_types == _alternating(5)
    d = c.to_dict()
    assert d["layer_types"] == list(_alternating(5))
    assert json.loads(json.dumps(d))["num_hidden_layers"] == 5
