"""`ossrt serve --lora NAME=DIR`: an adapter folder (PEFT layout) served as MODEL:NAME beside
the base model, selectable per request, through the official client. Its logprobs equal the
training code's own forward with the adapter (an independent implementation)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import openai
import pytest
import torch

from ossrt.harmony.tokenizer import get_tokenizer
from ossrt.model import load_model, preset, write_checkpoint
from ossrt.serve import ServeOptions, build_app
from ossrt.train.lora import LoraAdapter, LoraSpec, apply_lora_logits
from ossrt.train.peft_io import save_adapter

PROMPT = [200006, 1428, 200008, 13225, 11, 1495, 382, 261, 1746, 13]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, live_server, one_thread) -> Iterator[tuple]:
    root = tmp_path_factory.mktemp("lora-serve")
    write_checkpoint(preset("tiny"), root / "ckpt", seed=21)
    model = load_model(root / "ckpt", "float32", progress=False)
    adapter = LoraAdapter.create(model.cfg, LoraSpec(rank=4, alpha=8, targets=("attn", "router")),
                                 seed=5)
    g = torch.Generator().manual_seed(6)
    for name, t in adapter.named():
        if name.endswith("lora_B"):
            t.data = torch.randn(t.shape, generator=g) * 0.3
    save_adapter(adapter, root / "adapter")
    app = build_app(ServeOptions(model=str(root / "ckpt"), dtype="float32",
                                 served_model_names=("base",), data_dir=str(root / "data"),
                                 loras=(("mine", str(root / "adapter")),), python_tool=False))
    with live_server(app) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0), model, adapter
    app.state.ossrt.engine.close()


def first_logprobs(client: openai.OpenAI, model: str) -> dict[str, float]:
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=1, temperature=0,
                                  logprobs=5)
    return r.choices[0].logprobs.top_logprobs[0]


def test_adapter_is_listed_and_selectable_per_request(setup) -> None:
    client, model, adapter = setup
    ids = {m.id: m for m in client.models.list().data}
    assert set(ids) == {"base", "base:mine"}
    assert ids["base:mine"].model_extra["parent"] == "base"
    tuned, base = first_logprobs(client, "base:mine"), first_logprobs(client, "base")
    assert tuned != base
    ref = torch.log_softmax(apply_lora_logits(model, adapter, torch.tensor([PROMPT]))[0, -1], -1)
    top = torch.topk(ref, 5)
    want = {get_tokenizer().decode([i]): v for i, v in zip(top.indices.tolist(),
                                                            top.values.tolist())}
    assert set(want) == set(tuned)
    assert all(math.isclose(tuned[k], want[k], abs_tol=1e-3) for k in want)


def test_unknown_adapter_model_is_404(setup) -> None:
    client, _, _ = setup
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="base:other", prompt="x", max_tokens=1)


def test_bad_lora_argument_is_refused() -> None:
    from ossrt.cli import _lora_arg

    assert _lora_arg("a=/x") == ("a", "/x")
    with pytest.raises(SystemExit):
        _lora_arg("no-equals")
