"""The adapter on disk, in PEFT's LoRA layout for transformers' GptOssForCausalLM.

`adapter_config.json` (peft_type LORA, r, lora_alpha, lora_dropout, target_modules, ...) and
`adapter_model.safetensors` with float32 tensors:
- attention: `base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_A.weight` [r, in]
  and `.lora_B.weight` [out, r], exactly PEFT's names: `peft.PeftModel.from_pretrained` loads
  them onto GptOssForCausalLM (tests/test_train_peft.py compares logits).
- router and experts are ossrt extensions that PEFT does not load (its LoRA cannot wrap
  GptOssTopKRouter, and its `target_parameters` expert LoRA uses another tensor layout):
  `base_model.model.model.layers.{i}.mlp.router.ossrt_lora_A` [r, H] / `ossrt_lora_B` [E, r],
  `base_model.model.model.layers.{i}.mlp.experts.{gate_up_proj,down_proj}.ossrt_lora_A`
  [E, r, in] / `ossrt_lora_B` [E, out, r] (gate_up rows interleaved gate/linear, as ossrt and
  the MXFP4 checkpoint store them). They are listed in adapter_config.json under
  `ossrt_targets` (written only when they are present; PEFT warns that it ignores that key),
  not in `target_modules`: PEFT loads the attention part and leaves them out.
Same adapter -> same bytes (sorted keys, fixed metadata).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..model.config import GptOssConfig
from .lora import ATTN_MODULES, LoraAdapter, LoraSpec, check_adapter

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model.model.layers."


def peft_key(name: str) -> str:
    """`layers.{i}.{module}.lora_A` -> the on-disk key."""
    _, layer, module, ab = name.split(".")
    if module in ATTN_MODULES:
        return f"{_PREFIX}{layer}.self_attn.{module}.{ab}.weight"
    where = "mlp.router" if module == "router" else f"mlp.experts.{module}"
    return f"{_PREFIX}{layer}.{where}.ossrt_{ab}"


def _internal_key(key: str) -> str:
    rest = key[len(_PREFIX):]
    layer, *parts = rest.split(".")
    if parts[0] == "self_attn":
        return f"layers.{layer}.{parts[1]}.{parts[2]}"
    module = "router" if parts[1] == "router" else parts[2]
    return f"layers.{layer}.{module}.{parts[-1].removeprefix('ossrt_')}"


def adapter_config(spec: LoraSpec, base_model: str = "") -> dict[str, object]:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
        "target_modules": [m for m in ATTN_MODULES if "attn" in spec.targets],
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
    } | ({} if spec.targets == ("attn",) else {"ossrt_targets": list(spec.targets)})


def save_adapter(adapter: LoraAdapter, out: str | Path, base_model: str = "") -> Path:
    """Writes adapter_config.json + adapter_model.safetensors into `out`; returns `out`."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    tensors = {peft_key(k): v.detach().to(torch.float32).contiguous().cpu()
               for k, v in adapter.named()}
    tmp = root / (WEIGHTS_FILE + ".partial")
    save_file(dict(sorted(tensors.items())), str(tmp), metadata={"format": "pt"})
    tmp.replace(root / WEIGHTS_FILE)
    (root / CONFIG_FILE).write_text(json.dumps(adapter_config(adapter.spec, base_model),
                                               indent=2) + "\n")
    return root


def load_adapter(path: str | Path, device: torch.device | str = "cpu",
                 trainable: bool = False, model: GptOssConfig | None = None) -> LoraAdapter:
    """Reads an adapter folder written by `save_adapter` (or PEFT, attention targets).

    With `model` (a config), also checks that every tensor fits it (ValueError otherwise)."""
    root = Path(path)
    try:
        cfg = json.loads((root / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{root}: cannot read {CONFIG_FILE}: {exc}") from exc
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{root}: peft_type {cfg.get('peft_type')!r} is not LORA")
    if cfg.get("use_dora") or cfg.get("use_rslora") or cfg.get("bias", "none") != "none":
        raise ValueError(f"{root}: DoRA, rsLoRA and LoRA biases are not supported")
    targets = tuple(cfg.get("ossrt_targets") or ("attn",))
    extra = set(cfg.get("target_modules") or []) - set(ATTN_MODULES)
    if extra:
        raise ValueError(f"{root}: unsupported target_modules {sorted(extra)}")
    spec = LoraSpec(rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]),
                    dropout=float(cfg.get("lora_dropout", 0.0)), targets=targets)
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(root / WEIGHTS_FILE), framework="pt") as f:
        for key in f.keys():
            if not key.startswith(_PREFIX):
                raise ValueError(f"{root}: unexpected tensor {key!r}")
            tensors[_internal_key(key)] = f.get_tensor(key).to(device).requires_grad_(trainable)
    layers = 1 + max(int(k.split(".")[1]) for k in tensors) if tensors else 0
    adapter = LoraAdapter(spec, layers, tensors)
    if model is not None:
        check_adapter(model, adapter)
    return adapter
