"""The adapter outside ossrt: PEFT loads it onto transformers' GptOssForCausalLM with the same
logits; merged checkpoints load in ossrt with base+adapter logits; the CLI end to end."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ossrt.cli import main
from ossrt.model import load_model, preset, write_checkpoint
from ossrt.model.loader import read_checkpoint
from ossrt.model.mxfp4 import dequantize
from ossrt.train.lora import ATTN_MODULES, LoraAdapter, LoraSpec, train_forward
from ossrt.train.merge import merge_adapter
from ossrt.train.peft_io import (CONFIG_FILE, WEIGHTS_FILE, load_adapter, peft_key,
                                 save_adapter)

IDS = torch.randint(0, 200000, (2, 40), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("peft") / "tiny"
    write_checkpoint(preset("tiny"), path, seed=7)
    yield path


def _adapter(targets: tuple[str, ...], std: float = 0.05, seed: int = 0) -> LoraAdapter:
    adapter = LoraAdapter.create(preset("tiny"), LoraSpec(rank=4, alpha=8, targets=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in adapter.parameters():
            t.copy_(torch.randn(t.shape, generator=g) * std)
    return adapter


def test_peft_loads_our_adapter_with_the_same_logits(ckpt: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    pytest.importorskip("accelerate")
    ours = load_model(ckpt, "float32")
    hf = transformers.GptOssForCausalLM.from_pretrained(
        ckpt, quantization_config=transformers.Mxfp4Config(dequantize=True),
        dtype=torch.float32, attn_implementation="eager").eval()
    attn = _adapter(("attn",))
    save_adapter(attn, tmp_path / "attn", base_model=str(ckpt))
    config = json.loads((tmp_path / "attn" / CONFIG_FILE).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    tuned = peft.PeftModel.from_pretrained(hf, tmp_path / "attn").eval()
    with torch.no_grad():
        theirs = tuned(IDS).logits.float()
        mine = train_forward(ours, attn, IDS)
        base = ours.logits(ours(IDS))
    assert (mine - base).abs().max() > 0.1  # the adapter matters ...
    assert (theirs - mine).abs().max() < 1e-4  # ... and both runtimes apply it the same way
    # gradients: ours vs autograd through transformers + PEFT, same loss
    theirs_params = dict(tuned.named_parameters())
    for name, t in attn.named():
        theirs_params[peft_key(name).replace(".weight", ".default.weight")].requires_grad_(True)
    tuned(IDS).logits.float().logsumexp(-1).mean().backward()
    train_forward(ours, attn, IDS).logsumexp(-1).mean().backward()
    for name, t in attn.named():
        other = theirs_params[peft_key(name).replace(".weight", ".default.weight")].grad
        assert torch.allclose(t.grad, other, rtol=1e-3, atol=1e-5), name
    # an adapter that also tunes router and experts: PEFT loads its attention part only
    full = _adapter(("attn", "router", "experts"), seed=1)
    save_adapter(full, tmp_path / "full")
    tuned.load_adapter(tmp_path / "full", adapter_name="full")
    tuned.set_adapter("full")
    attn_part = LoraAdapter(LoraSpec(rank=4, alpha=8), 4, {
        k: v for k, v in full.tensors.items() if k.split(".")[2] in ATTN_MODULES})
    with torch.no_grad():
        assert (tuned(IDS).logits.float() - train_forward(ours, attn_part, IDS)).abs().max() < 1e-4
    tuned.set_adapter("default")
    # PEFT's own save of what it loaded is our file, key for key
    tuned.save_pretrained(tmp_path / "resaved")
    again = load_adapter(tmp_path / "resaved")
    assert set(again.tensors) == set(attn.tensors)
    assert all(torch.equal(again.tensors[k], attn.tensors[k]) for k in attn.tensors)


def test_merge_attention_adapter_is_exact(ckpt: Path, tmp_path: Path) -> None:
    base = load_model(ckpt, "float32")
    adapter = _adapter(("attn", "router"))
    save_adapter(adapter, tmp_path / "ad")
    report = merge_adapter(ckpt, tmp_path / "ad", tmp_path / "merged", dtype="float32")
    assert report.dense_merged == 4 * 5 and report.experts_requantized == 0
    assert report.requant_max_abs_err is None
    merged = load_model(tmp_path / "merged", "float32")
    with torch.no_grad():
        want = train_forward(base, adapter, IDS)
        assert (want - base.logits(base(IDS))).abs().max() > 0.1
        assert (merged.logits(merged(IDS)) - want).abs().max() < 1e-4
    # the released dtype: one bf16 rounding of each merged weight
    merge_adapter(ckpt, adapter, tmp_path / "bf16")
    assert read_checkpoint(tmp_path / "bf16").weights["layers.0.q_w"].dtype == torch.bfloat16


def test_merge_expert_adapter_within_requantization_error(ckpt: Path, tmp_path: Path) -> None:
    base = load_model(ckpt, "float32")
    adapter = _adapter(("experts",), std=0.3)
    report = merge_adapter(ckpt, adapter, tmp_path / "merged", dtype="float32")
    assert report.experts_requantized == 4 * 2 * 8
    assert 0 < report.requant_mean_abs_err <= report.requant_max_abs_err
    merged_w = read_checkpoint(tmp_path / "merged").weights
    base_w = read_checkpoint(ckpt).weights
    # every merged expert weight is W + scale * B @ A up to the reported error
    for layer in range(4):
        for module, key in (("gate_up_proj", "w1"), ("down_proj", "w2")):
            a, b = adapter.pair(layer, module)
            p = f"layers.{layer}.{key}"
            exact = dequantize(base_w[p + "_blocks"], base_w[p + "_scales"], torch.float32) + (
                adapter.spec.scale * torch.bmm(b.detach(), a.detach()))
            got = dequantize(merged_w[p + "_blocks"], merged_w[p + "_scales"], torch.float32)
            assert (got - exact).abs().max() <= report.requant_max_abs_err + 1e-6
    merged = load_model(tmp_path / "merged", "float32")
    with torch.no_grad():
        want = train_forward(base, adapter, IDS)
        effect = (want - base.logits(base(IDS))).abs().mean()
        err = (merged.logits(merged(IDS)) - want).abs().mean()
    assert err < 0.5 * effect, (float(err), float(effect))


def test_cli_finetune_and_merge(ckpt: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Say {w}"}, {"role": "assistant", "content": w}]}) + "\n"
        for w in ("one", "two", "three", "four")))
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(ckpt), "--train", str(data), "--validation",
                 str(data), "--out", str(out), "--lora-rank", "4", "--max-steps", "2",
                 "--epochs", "2", "--batch-size", "1", "--checkpoint-every", "1",
                 "--targets", "attn,router", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["val_loss"] is not None
    assert (out / CONFIG_FILE).is_file() and (out / WEIGHTS_FILE).is_file()
    assert (out / "checkpoints" / "step-1" / "state.pt").is_file()
    assert main(["merge", "--model", str(ckpt), "--adapter", str(out), "--out",
                 str(tmp_path / "merged")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dense_merged"] == 20
    assert load_model(tmp_path / "merged", "bfloat16").cfg == preset("tiny")

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n')
    assert main(["finetune", "--model", str(ckpt), "--train", str(bad), "--out",
                 str(tmp_path / "x"), "--quiet"]) == 2
    assert "line 1: 'messages' must be a non-empty list" in capsys.readouterr().err
