"""The LoRA training loop: deterministic, resumable, observable, cancellable.

- AdamW over the LoRA tensors only; the base model is frozen (and never copied).
- Deterministic: the adapter is initialised from `seed`, each epoch's row order is a
  permutation drawn from (seed, epoch), and LoRA dropout uses torch's global generator seeded
  with `seed` (its state is checkpointed). Same data + config + seed -> the same adapter bytes.
- Loss: mean next-token cross-entropy over the trained tokens of one optimizer step (all its
  micro-batches together), so gradient accumulation equals one large batch.
- Checkpoints: `out/checkpoints/step-N/` holds the adapter (PEFT layout) and `state.pt`
  (optimizer, step, RNG state, config); `resume=True` continues from the latest one and ends
  with the same adapter as an uninterrupted run.
- `on_event(dict)` receives {"event": "start" | "step" | "eval" | "checkpoint" | "done" |
  "cancelled", ...}; `cancel` (a threading.Event) is checked before every step: a cancelled
  run writes a checkpoint (so it can be resumed) and returns with `cancelled=True`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..model.model import GptOss, load_model
from .data import Batch, DataConfig, Example, PackedRow, collate, load_jsonl, pack
from .lora import LoraAdapter, LoraSpec, output_logits, train_hidden
from .peft_io import load_adapter, save_adapter

Event = dict[str, Any]
SCHEDULES = ("cosine", "linear", "constant")
# Fields that define the computation: a resumed run must use the same values.
_RESUME_FIELDS = ("lora_rank", "lora_alpha", "lora_dropout", "targets", "learning_rate",
                  "lr_schedule", "warmup_steps", "weight_decay", "epochs", "batch_size",
                  "grad_accum", "max_seq_len", "packing", "seed", "exclude_reasoning",
                  "max_grad_norm")


@dataclass(frozen=True, slots=True)
class TrainConfig:
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    targets: tuple[str, ...] = ("attn",)  # any of attn, router, experts
    learning_rate: float = 1e-3
    lr_schedule: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    epochs: int = 1
    batch_size: int = 1  # packed rows per micro-batch
    grad_accum: int = 1
    max_seq_len: int = 2048
    packing: bool = True
    seed: int = 0
    exclude_reasoning: bool = False
    max_grad_norm: float = 1.0  # 0 = no clipping
    eval_every: int = 0  # steps; 0 = only at the end (when there is validation data)
    checkpoint_every: int = 0  # steps; 0 = never (a cancel still checkpoints)
    gradient_checkpointing: bool = False
    autocast_bf16: bool = False
    max_steps: int | None = None  # stop after this many steps (the schedule keeps its length)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(SCHEDULES)}")
        for name in ("epochs", "batch_size", "grad_accum"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.learning_rate <= 0:
            raise ValueError("learning_rate must be positive")
        self.lora_spec()  # validates rank, dropout, targets
        DataConfig(max_seq_len=self.max_seq_len)

    def lora_spec(self) -> LoraSpec:
        return LoraSpec(self.lora_rank, self.lora_alpha, self.lora_dropout, tuple(self.targets))

    def data_config(self) -> DataConfig:
        return DataConfig(max_seq_len=self.max_seq_len, exclude_reasoning=self.exclude_reasoning)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        return d


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: Path | None  # None when cancelled
    steps: int
    total_steps: int
    losses: list[float] = field(default_factory=list)  # per step of this run
    val_loss: float | None = None
    cancelled: bool = False
    last_checkpoint: Path | None = None


def lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    """Learning rate of optimizer step `step` (0-based) of `total`."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    p = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    if cfg.lr_schedule == "cosine":
        return cfg.learning_rate * 0.5 * (1 + math.cos(math.pi * p))
    if cfg.lr_schedule == "linear":
        return cfg.learning_rate * (1 - p)
    return cfg.learning_rate


def _loss_sum(model: GptOss, adapter: LoraAdapter, batch: Batch, cfg: TrainConfig,
              training: bool) -> torch.Tensor:
    hidden = train_hidden(model, adapter, batch.ids, batch.positions, batch.segment,
                          training=training, gradient_checkpointing=cfg.gradient_checkpointing,
                          autocast_bf16=cfg.autocast_bf16)  # [B, T, H]
    labels = batch.labels.to(hidden.device)
    sel = labels != -100
    logits = output_logits(model, hidden[sel])  # [n, V], only trained positions
    return F.cross_entropy(logits, labels[sel], reduction="sum")


@torch.no_grad()
def evaluate(model: GptOss, adapter: LoraAdapter, rows: Sequence[PackedRow],
             cfg: TrainConfig) -> float:
    """Mean next-token loss over the trained tokens of `rows`."""
    total, n = 0.0, 0
    for i in range(0, len(rows), cfg.batch_size):
        batch = collate(rows[i:i + cfg.batch_size], model.cfg.pad_token_id)
        total += float(_loss_sum(model, adapter, batch, cfg, training=False))
        n += batch.trained_tokens
    return total / max(1, n)


def _order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def latest_checkpoint(out: str | Path) -> Path | None:
    root = Path(out) / "checkpoints"
    done = [p for p in root.glob("step-*") if (p / "state.pt").is_file()
            and p.name.removeprefix("step-").isdigit()]
    return max(done, key=lambda p: int(p.name.removeprefix("step-")), default=None)


def _save_checkpoint(out: Path, step: int, adapter: LoraAdapter, opt: torch.optim.Optimizer,
                     cfg: TrainConfig, base_model: str, data_id: str) -> Path:
    final = out / "checkpoints" / f"step-{step}"
    tmp = final.with_name(final.name + ".partial")
    save_adapter(adapter, tmp, base_model)
    torch.save({"step": step, "optimizer": opt.state_dict(), "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "config": cfg.to_dict(), "data": data_id}, tmp / "state.pt")
    if final.exists():
        import shutil
        shutil.rmtree(final)
    tmp.replace(final)
    return final


def _restore(ckpt: Path, adapter: LoraAdapter, opt: torch.optim.Optimizer,
             cfg: TrainConfig, data_id: str) -> int:
    state = torch.load(ckpt / "state.pt", weights_only=False)
    old, new = state["config"], cfg.to_dict()
    diff = [k for k in _RESUME_FIELDS if old.get(k) != new.get(k)]
    if diff:
        raise ValueError(f"cannot resume from {ckpt}: the config differs in {', '.join(diff)}")
    if state.get("data") != data_id:
        raise ValueError(f"cannot resume from {ckpt}: the training data differs")
    saved = load_adapter(ckpt)
    with torch.no_grad():
        for name, t in adapter.named():
            t.copy_(saved.tensors[name])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"])


def train(model: GptOss, train_examples: Sequence[Example], out: str | Path,
          cfg: TrainConfig = TrainConfig(), *,
          validation: Sequence[Example] | None = None,
          base_model: str = "",
          on_event: Callable[[Event], None] | None = None,
          cancel: threading.Event | None = None,
          resume: bool = False) -> TrainResult:
    """Trains a LoRA adapter on rendered examples; writes `out/adapter_model.safetensors` and
    `out/adapter_config.json` at the end (see the module docstring for checkpoints/events).

    Runs on the calling thread (`on_event` too). torch's global generator (LoRA dropout) is
    seeded inside and restored afterwards, so the caller's random state is untouched; with
    dropout, bit-exact reruns need no other thread drawing from it meanwhile.
    """
    devices = [model.device.index or 0] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        return _train(model, train_examples, Path(out), cfg, validation, base_model, on_event,
                      cancel, resume)


def _fingerprint(rows: Sequence[PackedRow]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(repr((r.input_ids, r.loss_mask, r.segment)).encode())
    return h.hexdigest()


def _train(model: GptOss, train_examples: Sequence[Example], out: Path, cfg: TrainConfig,
           validation: Sequence[Example] | None, base_model: str,
           on_event: Callable[[Event], None] | None, cancel: threading.Event | None,
           resume: bool) -> TrainResult:
    out.mkdir(parents=True, exist_ok=True)
    emit = on_event or (lambda e: None)
    torch.manual_seed(cfg.seed)
    adapter = LoraAdapter.create(model.cfg, cfg.lora_spec(), seed=cfg.seed, device=model.device)
    opt = torch.optim.AdamW(adapter.parameters(), lr=cfg.learning_rate,
                            weight_decay=cfg.weight_decay)
    rows = pack(train_examples, cfg.max_seq_len, cfg.packing)
    data_id = _fingerprint(rows)
    val_rows = pack(validation, cfg.max_seq_len, cfg.packing) if validation else []
    per_step = cfg.batch_size * cfg.grad_accum
    steps_per_epoch = math.ceil(len(rows) / per_step)
    total = steps_per_epoch * cfg.epochs
    stop = min(total, cfg.max_steps) if cfg.max_steps is not None else total
    step = 0
    if resume and (ckpt := latest_checkpoint(out)) is not None:
        step = _restore(ckpt, adapter, opt, cfg, data_id)
    emit({"event": "start", "step": step, "total_steps": total, "rows": len(rows),
          "examples": len(train_examples), "trainable_parameters":
          sum(p.numel() for p in adapter.parameters()), "resumed_from": step if step else None})
    losses: list[float] = []
    last_ckpt: Path | None = None
    val_loss: float | None = None
    pad = model.cfg.pad_token_id
    bar = tqdm(total=stop, initial=step, disable=not cfg.progress, desc="finetune", unit="step")
    try:
        while step < stop:
            if cancel is not None and cancel.is_set():
                last_ckpt = _save_checkpoint(out, step, adapter, opt, cfg, base_model, data_id)
                emit({"event": "cancelled", "step": step, "checkpoint": str(last_ckpt)})
                return TrainResult(None, step, total, losses, val_loss, True, last_ckpt)
            t0 = time.perf_counter()
            epoch, j = divmod(step, steps_per_epoch)
            order = _order(len(rows), cfg.seed, epoch)[j * per_step:(j + 1) * per_step]
            micro = [collate([rows[i] for i in order[k:k + cfg.batch_size]], pad)
                     for k in range(0, len(order), cfg.batch_size)]
            n_trained = sum(b.trained_tokens for b in micro)
            lr = lr_at(cfg, step, total)
            for group in opt.param_groups:
                group["lr"] = lr
            loss_total = 0.0
            for batch in micro:
                loss = _loss_sum(model, adapter, batch, cfg, training=True) / max(1, n_trained)
                loss.backward()
                loss_total += float(loss.detach())
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(adapter.parameters(), cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            tok_s = sum(b.tokens for b in micro) / dt if dt > 0 else 0.0
            losses.append(loss_total)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_total:.4f}", tok_s=f"{tok_s:.0f}")
            emit({"event": "step", "step": step, "total_steps": total, "epoch": epoch,
                  "loss": loss_total, "lr": lr, "tokens_per_second": tok_s,
                  "trained_tokens": n_trained})
            if val_rows and cfg.eval_every and step % cfg.eval_every == 0 and step < stop:
                val_loss = evaluate(model, adapter, val_rows, cfg)
                emit({"event": "eval", "step": step, "val_loss": val_loss})
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < stop:
                last_ckpt = _save_checkpoint(out, step, adapter, opt, cfg, base_model, data_id)
                emit({"event": "checkpoint", "step": step, "path": str(last_ckpt)})
    finally:
        bar.close()
    if val_rows:
        val_loss = evaluate(model, adapter, val_rows, cfg)
        emit({"event": "eval", "step": step, "val_loss": val_loss})
    adapter_dir = save_adapter(adapter, out, base_model)
    emit({"event": "done", "step": step, "adapter_dir": str(adapter_dir), "val_loss": val_loss,
          "loss": losses[-1] if losses else None})
    return TrainResult(adapter_dir, step, total, losses, val_loss, False, last_ckpt)


def finetune(model_dir: str | Path, train_file: str | Path, out: str | Path,
             cfg: TrainConfig = TrainConfig(), *,
             validation_file: str | Path | None = None,
             dtype: str = "float32", device: str = "cpu",
             on_event: Callable[[Event], None] | None = None,
             cancel: threading.Event | None = None,
             resume: bool = False) -> TrainResult:
    """The whole job: validate the data (DataError before any training), load the model,
    train. This is what a job API calls, on a worker thread."""
    examples, stats = load_jsonl(train_file, cfg.data_config())
    val = load_jsonl(validation_file, cfg.data_config())[0] if validation_file else None
    if on_event:
        on_event({"event": "data", "examples": stats.examples, "tokens": stats.tokens,
                  "trained_tokens": stats.trained_tokens, "truncated": stats.truncated,
                  "dropped": stats.dropped})
    model = load_model(model_dir, dtype, device, progress=False)
    return train(model, examples, out, cfg, validation=val, base_model=str(model_dir),
                 on_event=on_event, cancel=cancel, resume=resume)
