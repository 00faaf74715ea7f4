"""Model configuration: one frozen dataclass, read from either checkpoint layout.

`GptOssConfig.from_checkpoint_dir` reads `config.json` (Hugging Face layout) or
`original/config.json` (OpenAI's reference layout). Presets name the released shapes and a
`tiny` shape for tests; every preset keeps the released RoPE/YaRN settings and context length.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"

MXFP4_BLOCK = 32  # values per MXFP4 block, along a weight's input dimension


class ConfigError(ValueError):
    """A config.json that is missing, unreadable or inconsistent."""


def alternating_layer_types(num_layers: int) -> tuple[str, ...]:
    """gpt-oss alternates sliding / full attention, starting with sliding at layer 0."""
    return tuple(SLIDING if i % 2 == 0 else FULL for i in range(num_layers))


@dataclass(frozen=True, slots=True)
class GptOssConfig:
    num_hidden_layers: int = 24
    num_local_experts: int = 32
    num_experts_per_tok: int = 4
    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880
    head_dim: int = 64
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    sliding_window: int = 128
    layer_types: tuple[str, ...] = field(default_factory=lambda: alternating_layer_types(24))
    rope_theta: float = 150000.0
    rope_scaling_factor: float = 32.0
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    original_max_position_embeddings: int = 4096
    max_position_embeddings: int = 131072
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    rms_norm_eps: float = 1e-5
    eos_token_id: int = 200002
    pad_token_id: int = 199999

    def __post_init__(self) -> None:
        problems: list[str] = []
        positive = (
            "num_hidden_layers num_local_experts num_experts_per_tok vocab_size hidden_size "
            "intermediate_size head_dim num_attention_heads num_key_value_heads sliding_window"
        ).split()
        for name in positive:
            if int(getattr(self, name)) <= 0:
                problems.append(f"{name} must be positive")
        if self.num_experts_per_tok > self.num_local_experts:
            problems.append("num_experts_per_tok exceeds num_local_experts")
        if self.num_attention_heads % max(self.num_key_value_heads, 1):
            problems.append("num_attention_heads must be a multiple of num_key_value_heads")
        if self.head_dim % 2:
            problems.append("head_dim must be even (RoPE rotates halves)")
        for name in ("hidden_size", "intermediate_size"):
            if getattr(self, name) % MXFP4_BLOCK:
                problems.append(f"{name} must be a multiple of {MXFP4_BLOCK} (MXFP4 block size)")
        if len(self.layer_types) != self.num_hidden_layers:
            problems.append(
                f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers"
            )
        bad = sorted(set(self.layer_types) - {SLIDING, FULL})
        if bad:
            problems.append(f"unknown layer types {bad}")
        if problems:
            raise ConfigError("invalid gpt-oss config: " + "; ".join(problems))

    # ---- derived shapes -------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def window(self, layer: int) -> int | None:
        """Keys visible to a query on this layer (the query's own included), or None for all."""
        return self.sliding_window if self.layer_types[layer] == SLIDING else None

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts: embeddings, blocks (all experts) and active per token."""
        h, i, e = self.hidden_size, self.intermediate_size, self.num_local_experts
        attn = h * (self.q_dim + 2 * self.kv_dim) + (self.q_dim + 2 * self.kv_dim)
        attn += self.q_dim * h + h + self.num_attention_heads + h  # o_proj, bias, sinks, norm
        expert = h * 2 * i + 2 * i + i * h + h
        router = e * h + e
        per_layer_dense = attn + router + h
        embed = 2 * self.vocab_size * h + h
        blocks = self.num_hidden_layers * (per_layer_dense + e * expert)
        active = self.num_hidden_layers * (per_layer_dense + self.num_experts_per_tok * expert)
        # "Active" as OpenAI's model card counts it: the embedding lookup is not compute.
        unembed = self.vocab_size * h + h
        return {"embeddings": embed, "blocks": blocks, "total": embed + blocks,
                "active": active + unembed}

    # ---- Hugging Face layout ---------------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        """config.json as the released Hugging Face checkpoint writes it."""
        return {
            "architectures": ["GptOssForCausalLM"],
            "attention_bias": True,
            "attention_dropout": 0.0,
            "eos_token_id": self.eos_token_id,
            "experts_per_token": self.num_experts_per_tok,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initial_context_length": self.original_max_position_embeddings,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "layer_types": list(self.layer_types),
            "max_position_embeddings": self.max_position_embeddings,
            "model_type": "gpt_oss",
            "num_attention_heads": self.num_attention_heads,
            "num_experts_per_tok": self.num_experts_per_tok,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "num_local_experts": self.num_local_experts,
            "output_router_logits": False,
            "pad_token_id": self.pad_token_id,
            "quantization_config": {
                "modules_to_not_convert": [
                    "model.layers.*.self_attn",
                    "model.layers.*.mlp.router",
                    "model.embed_tokens",
                    "lm_head",
                ],
                "quant_method": "mxfp4",
            },
            "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": {
                "beta_fast": self.rope_beta_fast,
                "beta_slow": self.rope_beta_slow,
                "factor": self.rope_scaling_factor,
                "original_max_position_embeddings": self.original_max_position_embeddings,
                "rope_type": "yarn",
                "truncate": False,
            },
            "rope_theta": self.rope_theta,
            "router_aux_loss_coef": 0.9,
            "sliding_window": self.sliding_window,
            "swiglu_alpha": self.swiglu_alpha,
            "swiglu_limit": self.swiglu_limit,
            "tie_word_embeddings": False,
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> GptOssConfig:
        _require_object(d, "config")
        if d.get("model_type", "gpt_oss") != "gpt_oss":
            raise ConfigError(f"model_type is {d.get('model_type')!r}, not 'gpt_oss'")
        # transformers >= 5 writes `rope_parameters` (theta inside); releases write `rope_scaling`.
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        _require_object(rope, "rope_scaling")
        if rope and rope.get("rope_type", rope.get("type", "yarn")) != "yarn":
            raise ConfigError(f"unsupported rope_type {rope.get('rope_type')!r}: gpt-oss uses yarn")
        if rope.get("truncate", False):
            raise ConfigError("rope truncate=true is not what gpt-oss was trained with")
        q = d.get("quantization_config")
        if q is not None:
            _require_object(q, "quantization_config")
        if q is not None and q.get("quant_method") != "mxfp4":
            raise ConfigError(f"quantization_config.quant_method is {q.get('quant_method')!r}, "
                              "expected 'mxfp4'")
        n_layers = _req(d, "num_hidden_layers")
        eos = d.get("eos_token_id", 200002)
        return cls(
            num_hidden_layers=n_layers,
            num_local_experts=_req(d, "num_local_experts"),
            num_experts_per_tok=d.get("num_experts_per_tok", d.get("experts_per_token", 4)),
            vocab_size=_req(d, "vocab_size"),
            hidden_size=_req(d, "hidden_size"),
            intermediate_size=_req(d, "intermediate_size"),
            head_dim=d.get("head_dim", 64),
            num_attention_heads=_req(d, "num_attention_heads"),
            num_key_value_heads=_req(d, "num_key_value_heads"),
            sliding_window=d.get("sliding_window") or 128,
            layer_types=tuple(d.get("layer_types") or alternating_layer_types(n_layers)),
            rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 150000.0))),
            rope_scaling_factor=float(rope.get("factor", 32.0)),
            rope_beta_fast=float(rope.get("beta_fast", 32.0)),
            rope_beta_slow=float(rope.get("beta_slow", 1.0)),
            original_max_position_embeddings=int(
                rope.get("original_max_position_embeddings", d.get("initial_context_length", 4096))
            ),
            max_position_embeddings=d.get("max_position_embeddings", 131072),
            swiglu_limit=float(d.get("swiglu_limit", 7.0)),
            swiglu_alpha=float(d.get("swiglu_alpha", 1.702)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            eos_token_id=eos[0] if isinstance(eos, list) else int(eos),
            pad_token_id=d.get("pad_token_id") if d.get("pad_token_id") is not None else 199999,
        )

    # ---- OpenAI reference layout -----------------------------------------------------------
    def to_original_dict(self) -> dict[str, Any]:
        """original/config.json as OpenAI's reference checkpoint writes it."""
        if self.layer_types != alternating_layer_types(self.num_hidden_layers):
            raise ConfigError("the original layout can only express alternating layer types")
        return {
            "num_hidden_layers": self.num_hidden_layers,
            "num_experts": self.num_local_experts,
            "experts_per_token": self.num_experts_per_tok,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "swiglu_limit": self.swiglu_limit,
            "head_dim": self.head_dim,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "sliding_window": self.sliding_window,
            "initial_context_length": self.original_max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rope_scaling_factor": self.rope_scaling_factor,
            "rope_ntk_alpha": self.rope_beta_slow,
            "rope_ntk_beta": self.rope_beta_fast,
        }

    @classmethod
    def from_original_dict(cls, d: dict[str, Any]) -> GptOssConfig:
        _require_object(d, "config")
        n_layers = _req(d, "num_hidden_layers")
        factor = float(d.get("rope_scaling_factor", 32.0))
        initial = int(d.get("initial_context_length", 4096))
        return cls(
            num_hidden_layers=n_layers,
            num_local_experts=_req(d, "num_experts"),
            num_experts_per_tok=d.get("experts_per_token", 4),
            vocab_size=_req(d, "vocab_size"),
            hidden_size=_req(d, "hidden_size"),
            intermediate_size=_req(d, "intermediate_size"),
            head_dim=d.get("head_dim", 64),
            num_attention_heads=_req(d, "num_attention_heads"),
            num_key_value_heads=_req(d, "num_key_value_heads"),
            sliding_window=d.get("sliding_window", 128),
            layer_types=alternating_layer_types(n_layers),
            rope_theta=float(d.get("rope_theta", 150000.0)),
            rope_scaling_factor=factor,
            rope_beta_fast=float(d.get("rope_ntk_beta", 32.0)),
            rope_beta_slow=float(d.get("rope_ntk_alpha", 1.0)),
            original_max_position_embeddings=initial,
            max_position_embeddings=int(initial * factor),
            swiglu_limit=float(d.get("swiglu_limit", 7.0)),
        )

    # ---- files -----------------------------------------------------------------------------
    @classmethod
    def from_checkpoint_dir(cls, path: str | Path) -> tuple[GptOssConfig, str]:
        """Reads a checkpoint folder's config; returns it with the layout found ('hf'/'original')."""
        root = Path(path)
        if (root / "config.json").is_file():
            return cls.from_hf_dict(_read_json(root / "config.json")), "hf"
        if (root / "original" / "config.json").is_file():
            return cls.from_original_dict(_read_json(root / "original" / "config.json")), "original"
        raise ConfigError(f"{root}: no config.json (Hugging Face layout) or original/config.json "
                          "(reference layout) found")

    def replace(self, **changes: Any) -> GptOssConfig:
        if "num_hidden_layers" in changes and "layer_types" not in changes:
            changes["layer_types"] = alternating_layer_types(changes["num_hidden_layers"])
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layer_types"] = list(self.layer_types)
        return d


def _require_object(value: Any, what: str) -> None:
    if not isinstance(value, dict):
        raise ConfigError(f"{what} must be a JSON object, not {type(value).__name__}")


def _req(d: dict[str, Any], key: str) -> Any:
    if key not in d:
        raise ConfigError(f"config is missing required field {key!r}")
    return d[key]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: config must be a JSON object")
    return data


PRESETS: dict[str, GptOssConfig] = {
    "20b": GptOssConfig(),
    "120b": GptOssConfig(num_hidden_layers=36, num_local_experts=128,
                         layer_types=alternating_layer_types(36)),
    # Every gpt-oss feature on, at test size: sinks, a 16-token window, 8 experts with top-2,
    # GQA, the released YaRN settings and 131,072-token context. The blocks hold ~0.45M
    # parameters; the embeddings keep the full o200k_harmony vocabulary so that the tiny model
    # reads and writes real text through the real tokenizer.
    "tiny": GptOssConfig(num_hidden_layers=4, num_local_experts=8, num_experts_per_tok=2,
                         hidden_size=64, intermediate_size=64, head_dim=16,
                         num_attention_heads=4, num_key_value_heads=2, sliding_window=16,
                         layer_types=alternating_layer_types(4)),
}


def preset(name: str) -> GptOssConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}") from None


def yarn_low_high(cfg: GptOssConfig) -> tuple[float, float]:
    """YaRN's correction range in rotary-dimension indices (unrounded, as gpt-oss uses)."""
    d, base, orig = cfg.head_dim, cfg.rope_theta, cfg.original_max_position_embeddings

    def dim_for(n_rot: float) -> float:
        return d * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    return dim_for(cfg.rope_beta_fast), dim_for(cfg.rope_beta_slow)
