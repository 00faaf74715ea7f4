"""`ossrt finetune` and `ossrt merge`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def _cmd_finetune(args: argparse.Namespace) -> int:
    from .data import DataError
    from .trainer import TrainConfig, finetune

    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    cfg = TrainConfig(lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                      lora_dropout=args.lora_dropout, targets=targets,
                      learning_rate=args.learning_rate, lr_schedule=args.lr_schedule,
                      warmup_steps=args.warmup_steps, epochs=args.epochs,
                      batch_size=args.batch_size, grad_accum=args.grad_accum,
                      max_seq_len=args.max_seq_len, packing=not args.no_packing, seed=args.seed,
                      exclude_reasoning=args.exclude_reasoning, eval_every=args.eval_every,
                      checkpoint_every=args.checkpoint_every,
                      gradient_checkpointing=args.gradient_checkpointing,
                      max_steps=args.max_steps, progress=not args.quiet)

    def on_event(ev: dict[str, Any]) -> None:
        if ev["event"] in ("data", "start", "eval", "checkpoint", "done", "cancelled"):
            print(json.dumps(ev), file=sys.stderr)

    try:
        result = finetune(args.model, args.train, args.out, cfg,
                          validation_file=args.validation, dtype=args.dtype, device=args.device,
                          on_event=on_event, resume=args.resume)
    except DataError as exc:
        print(f"ossrt finetune: invalid data: {exc}", file=sys.stderr)
        return 2
    first = result.losses[0] if result.losses else None
    last = result.losses[-1] if result.losses else None
    print(json.dumps({"adapter_dir": str(result.adapter_dir), "steps": result.steps,
                      "first_loss": first, "last_loss": last, "val_loss": result.val_loss}))
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from .merge import merge_adapter

    report = merge_adapter(args.model, args.adapter, args.out, dtype=args.dtype)
    print(json.dumps({"out": str(report.out), "dtype": report.dtype,
                      "dense_merged": report.dense_merged,
                      "experts_requantized": report.experts_requantized,
                      "requant_max_abs_err": report.requant_max_abs_err,
                      "requant_mean_abs_err": report.requant_mean_abs_err}))
    return 0


def register_cli(subparsers: Any) -> None:
    """Adds `finetune` and `merge` to ossrt's sub-command parser."""
    ft = subparsers.add_parser("finetune", help="train a LoRA adapter on chat JSONL "
                               "(docs/fine-tuning.md)")
    ft.add_argument("--model", required=True, help="base checkpoint folder")
    ft.add_argument("--train", required=True, help="chat fine-tuning JSONL")
    ft.add_argument("--validation", default=None, help="validation JSONL")
    ft.add_argument("--out", required=True, help="output folder (adapter + checkpoints/)")
    ft.add_argument("--lora-rank", type=int, default=8)
    ft.add_argument("--lora-alpha", type=float, default=16.0)
    ft.add_argument("--lora-dropout", type=float, default=0.0)
    ft.add_argument("--learning-rate", type=float, default=1e-3)
    ft.add_argument("--lr-schedule", choices=["cosine", "linear", "constant"], default="cosine")
    ft.add_argument("--warmup-steps", type=int, default=0)
    ft.add_argument("--epochs", type=int, default=1)
    ft.add_argument("--batch-size", type=int, default=1, help="packed rows per micro-batch")
    ft.add_argument("--grad-accum", type=int, default=1)
    ft.add_argument("--max-seq-len", type=int, default=2048)
    ft.add_argument("--no-packing", action="store_true", help="one example per row")
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--targets", default="attn", help="comma list of attn, router, experts")
    ft.add_argument("--exclude-reasoning", action="store_true",
                    help="do not train on analysis-channel (reasoning) tokens")
    ft.add_argument("--eval-every", type=int, default=0)
    ft.add_argument("--checkpoint-every", type=int, default=0)
    ft.add_argument("--max-steps", type=int, default=None)
    ft.add_argument("--gradient-checkpointing", action="store_true")
    ft.add_argument("--resume", action="store_true", help="continue from out/checkpoints")
    ft.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="base model compute dtype (LoRA tensors are always float32)")
    ft.add_argument("--device", default="cpu")
    ft.add_argument("--quiet", action="store_true", help="no progress bar")
    ft.set_defaults(func=_cmd_finetune)

    mg = subparsers.add_parser("merge", help="fold a LoRA adapter into a full checkpoint")
    mg.add_argument("--model", required=True, help="base checkpoint folder")
    mg.add_argument("--adapter", required=True, help="adapter folder (adapter_config.json ...)")
    mg.add_argument("--out", required=True, help="folder to write")
    mg.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                    help="dense weights of the merged checkpoint")
    mg.set_defaults(func=_cmd_merge)
