"""The trainer: it learns a task (held-out prompts answered), same seed -> same adapter bytes,
resume after a crash or a cancel -> the uninterrupted run's adapter, events and cancel."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ossrt.harmony import UserMessage, get_tokenizer, render_prompt
from ossrt.harmony.tokenizer import CALL, RETURN
from ossrt.model import load_model, preset, write_checkpoint
from ossrt.model.model import GptOss
from ossrt.train.data import Example, parse_conversation, render_example
from ossrt.train.lora import greedy_decode
from ossrt.train.peft_io import WEIGHTS_FILE, load_adapter
from ossrt.train.trainer import TrainConfig, latest_checkpoint, train

CODES = {"apple": "red", "banana": "blue", "cherry": "green", "grape": "gold"}
TEMPLATES = ["What is the code word for {}?", "Code word for {}, please.",
             "Tell me the code word of {}.", "{}: code word?", "I need the {} code word.",
             "code word {}", "Say the code word for {} now.", "The code word for {} is what?",
             "Remind me: {} code word", "Which code word goes with {}?"]


def _example(key: str, template: int) -> Example:
    convo = parse_conversation({"messages": [
        {"role": "user", "content": TEMPLATES[template].format(key)},
        {"role": "assistant", "content": CODES[key]}]}, 1)
    ids, mask = render_example(convo)
    return Example(1, tuple(ids), tuple(mask))


def _split() -> tuple[list[Example], list[tuple[str, int]]]:
    """36 training conversations; each key's held-out template is one it never saw."""
    train_set, held = [], []
    for i, key in enumerate(CODES):
        for t in range(len(TEMPLATES)):
            if t == 2 * i + 1:
                held.append((key, t))
            else:
                train_set.append(_example(key, t))
    return train_set, held


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Iterator[GptOss]:
    path = tmp_path_factory.mktemp("trainer") / "tiny"
    write_checkpoint(preset("tiny"), path, seed=0)
    yield load_model(path, "float32")


def _answer(model: GptOss, adapter: Any, key: str, template: int) -> str:
    prompt = render_prompt([UserMessage(TEMPLATES[template].format(key))])
    return get_tokenizer().decode(greedy_decode(model, adapter, prompt, 5, (RETURN, CALL)))


def test_training_learns_the_task(model: GptOss, tmp_path: Path) -> None:
    train_set, held = _split()
    events: list[dict[str, Any]] = []
    cfg = TrainConfig(lora_rank=16, lora_alpha=32, learning_rate=3e-3, lr_schedule="constant",
                      epochs=10, batch_size=4, packing=False, targets=("attn", "experts"),
                      eval_every=30, progress=False)
    val = [_example(k, t) for k, t in held]
    result = train(model, train_set, tmp_path, cfg, validation=val, on_event=events.append)
    assert result.steps == 90 and len(result.losses) == 90
    first, last = result.losses[0], sum(result.losses[-5:]) / 5
    assert last < 0.2 * first, (first, last)
    vals = [e["val_loss"] for e in events if e["event"] == "eval"]
    assert len(vals) == 3 and vals[-1] < 0.2 * first
    steps = [e for e in events if e["event"] == "step"]
    assert steps[0]["step"] == 1 and steps[0]["tokens_per_second"] > 0
    assert events[-1]["event"] == "done"

    adapter = load_adapter(result.adapter_dir)
    want = {key: f"<|channel|>final<|message|>{CODES[key]}<|return|>" for key in CODES}
    base = [_answer(model, None, k, t) for k, t in held]
    tuned = [_answer(model, adapter, k, t) for k, t in held]
    assert not any(b == want[k] for b, (k, _) in zip(base, held)), base
    right = sum(a == want[k] for a, (k, _) in zip(tuned, held))
    # Unseen (key, template) pairs: a 0.45M-parameter random model generalises to most.
    assert right >= 3, tuned
    assert _answer(model, adapter, "banana", 0) == want["banana"]  # a trained prompt


def _small_cfg(**kw: Any) -> TrainConfig:
    return TrainConfig(**{**dict(lora_rank=4, lora_alpha=8, lora_dropout=0.1,
                                 learning_rate=5e-3, warmup_steps=2, epochs=3, batch_size=2,
                                 grad_accum=2, max_seq_len=160, targets=("attn", "experts"),
                                 checkpoint_every=2, seed=7, progress=False), **kw})


class _Crash(RuntimeError):
    pass


def test_same_seed_same_bytes_and_resume(model: GptOss, tmp_path: Path) -> None:
    data = _split()[0][::4]  # 9 examples -> 5 packed rows of <= 160 tokens -> 2 steps/epoch
    cfg = _small_cfg()
    runs = {}
    for name in ("a", "b"):
        result = train(model, data, tmp_path / name, cfg)
        runs[name] = (result.adapter_dir / WEIGHTS_FILE).read_bytes()
    assert result.steps == result.total_steps == 6
    assert runs["a"] == runs["b"]
    other = train(model, data, tmp_path / "seed8", _small_cfg(seed=8))
    assert (other.adapter_dir / WEIGHTS_FILE).read_bytes() != runs["a"]

    # A crash after step 5: the last checkpoint is step 4; resuming redoes step 5.
    def crash(ev: dict[str, Any]) -> None:
        if ev["event"] == "step" and ev["step"] == 5:
            raise _Crash
    with pytest.raises(_Crash):
        train(model, data, tmp_path / "c", cfg, on_event=crash)
    assert latest_checkpoint(tmp_path / "c").name == "step-4"
    events: list[dict[str, Any]] = []
    resumed = train(model, data, tmp_path / "c", cfg, resume=True, on_event=events.append)
    assert events[0]["resumed_from"] == 4 and resumed.steps == 6 and len(resumed.losses) == 2
    assert (tmp_path / "c" / WEIGHTS_FILE).read_bytes() == runs["a"]

    # A cancel: checked before each step, it checkpoints where it stops.
    cancel = threading.Event()

    def cancel_at_3(ev: dict[str, Any]) -> None:
        if ev["event"] == "step" and ev["step"] == 3:
            cancel.set()
    stopped = train(model, data, tmp_path / "d", cfg, on_event=cancel_at_3, cancel=cancel)
    assert stopped.cancelled and stopped.steps == 3 and stopped.adapter_dir is None
    assert stopped.last_checkpoint == tmp_path / "d" / "checkpoints" / "step-3"
    train(model, data, tmp_path / "d", cfg, resume=True)
    assert (tmp_path / "d" / WEIGHTS_FILE).read_bytes() == runs["a"]

    with pytest.raises(ValueError, match="learning_rate"):
        train(model, data, tmp_path / "d", _small_cfg(learning_rate=1e-3), resume=True)
    with pytest.raises(ValueError, match="training data differs"):
        train(model, data[1:], tmp_path / "d", cfg, resume=True)
    # the caller's random state is left as it was
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train(model, data[:1], tmp_path / "e", _small_cfg(epochs=1))
    assert torch.equal(torch.rand(3), expected)


def test_adapter_survives_a_round_trip(model: GptOss, tmp_path: Path) -> None:
    data = _split()[0][:2]
    result = train(model, data, tmp_path, _small_cfg(epochs=1, checkpoint_every=0))
    again = load_adapter(result.adapter_dir)
    ckpt_free = not (tmp_path / "checkpoints").exists()
    assert ckpt_free and again.spec.rank == 4 and again.spec.targets == ("attn", "experts")
    assert set(again.tensors) == {f"layers.{n}.{m}.lora_{ab}" for n in range(4)
                                  for m in ("q_proj", "k_proj", "v_proj", "o_proj",
                                            "gate_up_proj", "down_proj") for ab in "AB"}
    assert again.tensors["layers.0.gate_up_proj.lora_A"].shape == (8, 4, 64)
    assert all(t.dtype == torch.float32 for t in again.tensors.values())
    load_adapter(result.adapter_dir, model=model.cfg)  # fits
    with pytest.raises(ValueError, match="does not fit"):
        load_adapter(result.adapter_dir, model=model.cfg.replace(hidden_size=96))
