"""Seconds per training step of the default model's stage 2, by autocast dtype and LoRA dropout.

    python benchmarks/training_step_time.py --stage1 runs/default-recipe/stage1 --data runs/default-recipe/data \
        --steps 4 bf16:0.05 bf16:0.0 fp32:0.05

Each configuration trains ``--steps`` steps (batch 4, the 8-turn conversations, LoRA r=16 on all LLM linear
layers + projector) with ``divico.training.train`` from the stage-1 checkpoint, one after the other in one run,
and prints the wall time of the whole ``train`` call (dataset, Trainer set-up, steps) divided by the steps.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from divico.config import CompressionConfig
from divico.training import TrainingConfig, train
from divico_testbed.recipe import load_base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage1", type=Path, required=True, help="a finished recipe's stage1 folder")
    parser.add_argument("--data", type=Path, required=True, help="the recipe's data folder")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("configs", nargs="+", help="DTYPE:DROPOUT, DTYPE in {bf16, fp32}, e.g. bf16:0.05")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    conversations = args.data / "llava_train_multiturn8.json"
    if not conversations.is_file():
        parser.error(f"{conversations} not found; run `divico retrain-default` first")
    for spec in args.configs:
        dtype, _, dropout = spec.partition(":")
        if dtype not in ("bf16", "fp32") or not dropout:
            parser.error(f"config must be bf16:DROPOUT or fp32:DROPOUT, got {spec!r}")
        model, processor = load_base(args.stage1)
        with tempfile.TemporaryDirectory() as out:
            started = time.perf_counter()
            train(model, processor, TrainingConfig(
                data_path=conversations, image_folder=args.data, output_dir=out,
                compression=CompressionConfig("deco", keep_ratio=1.0), beta=0.0, lora_r=16, lora_alpha=32,
                lora_dropout=float(dropout), learning_rate=1e-3, max_steps=args.steps, per_device_batch_size=4,
                seed=0, save_steps=10_000, bf16=dtype == "bf16", show_progress=False, report_to="none",
                resume=False))
            seconds = time.perf_counter() - started
        print(f"{spec}: {seconds / args.steps:.1f} s per step ({args.steps} steps, {seconds:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
