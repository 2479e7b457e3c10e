"""`divico train`: fine-tune a compressed LVLM (DiViCo + LoRA + KL, DeCo projector, FastV + LoRA) on LLaVA data."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from divico.cli_options import add_compression_arguments, compression_from_args
from divico.models import load_model_and_processor
from divico.registry import trainable_methods
from divico.training import DataError, TrainingConfig, train
from divico.training.trainer import PAPER_KEEP_RATIO


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train DiViCo's encoder + LoRA (or DeCo's projector, or FastV + LoRA) on LLaVA-format data",
        description=(
            "Fine-tune a vision-language model with visual-token compression (paper Algorithm 1: loss = LM loss on "
            "assistant tokens + beta * KL). Writes only the trained parts (config.json, compressor.safetensors, "
            "lora/) to --output; reload them with divico.load_compressor(base_model, OUTPUT). Re-running with the "
            "same --output resumes from the last checkpoint. With --eval-data the answer loss on those records is "
            "measured every --eval-steps steps, --output receives the best evaluation's weights, and "
            "--early-stopping-patience stops training when it no longer improves; OUTPUT/learning_curve.json and "
            "OUTPUT/training_summary.json record the curve, the steps run and the best step. For several GPUs: "
            "accelerate launch --num_processes N -m divico.cli train ..."
        ),
    )
    parser.add_argument("--model", required=True,
                        help="model folder or hub id (from_pretrained), or a registered name such as 'default' (the "
                        "testbed's default model)")
    parser.add_argument("--data", required=True, help="LLaVA-format training data (.json list or .jsonl)")
    parser.add_argument("--image-folder", default=None, help="folder the records' image paths are relative to")
    parser.add_argument("--output", required=True, help="output folder for the trained parts and checkpoints")
    add_compression_arguments(
        parser, methods=trainable_methods(), default_method="divico",
        method_help="compression method to train (default: divico)",
        keep_ratio_help="share of visual tokens kept, in (0, 1] (default 64/576 = 0.111)", with_compressor=False,
    )
    parser.add_argument("--beta", type=float, default=0.02, help="weight of the KL term, >= 0 (default 0.02)")
    parser.add_argument("--kl-reduction", default="sum", choices=("sum", "mean"),
                        help="KL per kept token: summed over the d dimensions as the paper's Eq. 8 (default), or "
                        "their mean (d times weaker; the reduction checkpoints saved before this option used)")
    parser.add_argument("--visual-word-weight", type=float, default=0.0,
                        help="weight of the visual word loss on records with 'visual_words', >= 0 (default 0: off)")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank; 0 disables LoRA (default 16)")
    parser.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA alpha (default 32)")
    parser.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout (default 0.05)")
    parser.add_argument("--lora-target-modules", nargs="+", default=None, metavar="NAME",
                        help="decoder-layer linear layers that get LoRA (default: q/k/v/o/gate/up/down_proj)")
    parser.add_argument("--max-steps", type=int, default=-1, help="optimiser steps; overrides --epochs when > 0")
    parser.add_argument("--epochs", type=float, default=1.0, help="epochs (default 1)")
    parser.add_argument("--lr", type=float, default=2e-4, help="learning rate (default 2e-4)")
    parser.add_argument("--batch-size", type=int, default=4, help="samples per device per micro-step (default 4)")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimiser step (default 1)")
    parser.add_argument("--warmup", type=float, default=0.03,
                        help="warmup: share of steps if < 1, else steps (default 0.03)")
    parser.add_argument("--bf16", action="store_true", help="bf16 weights for the frozen base + bf16 autocast")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations to save memory")
    parser.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    parser.add_argument("--logging-steps", type=int, default=10, help="log loss and KL every N steps (default 10)")
    parser.add_argument("--save-steps", type=int, default=None,
                        help="checkpoint every N steps (default 500; with --eval-data, at every evaluation)")
    parser.add_argument("--eval-data", default=None, metavar="FILE",
                        help="LLaVA-format validation records (images under --image-folder); their answer loss (the "
                        "LM loss on assistant tokens, without the KL term) is eval_loss")
    parser.add_argument("--eval-steps", type=int, default=None, metavar="N",
                        help="validate every N optimiser steps and after the last one, N >= 1 (default: "
                        "--logging-steps); needs --eval-data")
    parser.add_argument("--early-stopping-patience", type=int, default=None, metavar="K",
                        help="stop when K evaluations in a row (K >= 1) have not improved on the best eval_loss "
                        "(default: off, train for --max-steps / --epochs); needs --eval-data")
    parser.add_argument("--early-stopping-threshold", type=float, default=0.0, metavar="DELTA",
                        help="an evaluation counts as an improvement when its eval_loss is lower than the best by "
                        "more than DELTA >= 0 (default 0); needs --eval-data")
    parser.add_argument("--save-last", action="store_true",
                        help="with --eval-data, write the last step's weights to --output instead of those of the "
                        "evaluation with the lowest eval_loss")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default 0)")
    parser.add_argument("--skip-invalid", action="store_true",
                        help="leave out invalid records (and report how many) instead of stopping")
    parser.add_argument("--init-from", type=Path, default=None, metavar="DIR",
                        help="warm start from an earlier run's output folder (same method, encoder and LoRA "
                        "settings; fresh optimiser and schedule)")
    parser.add_argument("--no-resume", action="store_true", help="start afresh even if checkpoints exist")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        compression = compression_from_args(args, default_keep_ratio=PAPER_KEEP_RATIO)
        if compression is not None:
            compression = dataclasses.replace(compression, kl_reduction=args.kl_reduction)
        config = TrainingConfig(
            data_path=args.data, output_dir=args.output, image_folder=args.image_folder, compression=compression,
            beta=args.beta, visual_word_weight=args.visual_word_weight, lora_r=args.lora_r,
            lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
            lora_target_modules=args.lora_target_modules, learning_rate=args.lr, warmup=args.warmup,
            num_epochs=args.epochs, max_steps=args.max_steps, per_device_batch_size=args.batch_size,
            gradient_accumulation_steps=args.grad_accum, bf16=args.bf16,
            gradient_checkpointing=args.gradient_checkpointing, seed=args.seed, logging_steps=args.logging_steps,
            save_steps=args.save_steps, dataloader_num_workers=args.num_workers, skip_invalid=args.skip_invalid,
            resume=not args.no_resume, init_from=args.init_from, show_progress=not args.no_progress,
            eval_data_path=args.eval_data, eval_steps=args.eval_steps,
            early_stopping_patience=args.early_stopping_patience,
            early_stopping_threshold=args.early_stopping_threshold, save_best=not args.save_last,
        )
        model, processor = load_model_and_processor(args.model, torch.bfloat16 if args.bf16 else torch.float32)
        result = train(model, processor, config)
    except (DataError, FileNotFoundError, ValueError, TypeError) as error:
        print(f"divico train: {error}", file=sys.stderr)
        return 2
    losses = [entry for entry in result.log_history if "loss" in entry]
    print(f"trained {result.global_step} steps on {result.num_samples} samples "
          f"({result.num_skipped} skipped), {result.trainable_parameters / 1e6:.3f}M trained parameters")
    if losses:
        last = losses[-1]
        kl = f", KL {last['kl']:.4f}" if "kl" in last else ""
        print(f"last logged loss {last['loss']:.4f}{kl} (step {last['step']})")
    if result.best_step is not None:
        stopped = "stopped early" if result.stopped_early else "ran to the last step"
        print(f"best validation loss {result.best_eval_loss:.4f} at step {result.best_step} ({stopped}); "
              f"saved the weights of step {result.saved_step}")
    print(f"wrote {result.output_dir} (load with divico.load_compressor(base_model, {str(result.output_dir)!r}))")
    return 0
