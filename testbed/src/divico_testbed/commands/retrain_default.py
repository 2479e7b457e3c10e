"""`divico retrain-default`: retrain every shipped checkpoint of the default model (resumable)."""

from __future__ import annotations

import argparse
from pathlib import Path

from divico_testbed.data.benchmarks import MAX_CHOICE_ORDERS
from divico_testbed.learning_curves import write_learning_curves
from divico_testbed.recipe import RecipeConfig, export_assets, run_recipe


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "retrain-default",
        help="Retrain the default model (projector, LoRA) and every compressor from scratch; resumable.",
        description="Stage 1 projector alignment, stage 2 instruction tuning (LoRA), then DiViCo and DeCo at "
        "16.7%% / 11.1%% / 6.7%% kept tokens and the ablation variants. Rerun the same command to resume.",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/default-recipe"))
    parser.add_argument("--steps-scale", type=float, default=1.0,
                        help="multiply every stage's step count (e.g. 4 on a GPU)")
    parser.add_argument("--stage2-init", type=Path, default=None,
                        help="continue stage 2 from a trained stage-2 folder (e.g. the shipped assets' stage2; "
                        "stage 1 is skipped), for --stage2-steps more steps")
    parser.add_argument("--stage2-steps", type=int, default=None,
                        help="stage-2 steps (default: the recipe's, times --steps-scale)")
    parser.add_argument("--compressor-steps", type=int, default=None,
                        help="most steps of each stage-3 compressor run, which stops earlier when its validation "
                        "loss stops improving (default: the recipe's, times --steps-scale)")
    parser.add_argument("--compressor-patience", type=int, default=None, metavar="K",
                        help="stop a compressor run after K evaluations in a row without a lower validation answer "
                        "loss; 0 turns validation off (keep the last step) "
                        f"(default {RecipeConfig.compressor_patience})")
    parser.add_argument("--compressor-eval-steps", type=int, default=None, metavar="N",
                        help="validate each compressor every N steps, N >= 1 "
                        f"(default {RecipeConfig.compressor_eval_steps})")
    parser.add_argument("--compressor-eval-records", type=int, default=None, metavar="N",
                        help="validation records (the first N of the generated validation split), N >= 1 "
                        f"(default {RecipeConfig.compressor_eval_records})")
    parser.add_argument("--choice-orders", type=int, default=None,
                        help="option orders in which stage 2 asks each multiple-choice question (default 1; "
                        "more show the same content behind other letters)")
    parser.add_argument("--only", nargs="*", default=None, help="stage-3 runs to train (default: all)")
    parser.add_argument("--export", action="store_true",
                        help="copy the trained parts into the package assets (what `divico demo` loads)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--curves", type=Path, default=None, metavar="DIR",
                        help="write DIR/learning_curves.png and DIR/training.md (steps, kept step, validation "
                        "losses) of the finished compressor runs")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        validation: dict[str, int | None] = {}
        if args.compressor_patience is not None:
            if args.compressor_patience < 0:
                raise ValueError(f"--compressor-patience must be >= 0 (0: off), got {args.compressor_patience}.")
            validation["compressor_patience"] = args.compressor_patience or None
        for flag, name in (("--compressor-eval-steps", "compressor_eval_steps"),
                           ("--compressor-eval-records", "compressor_eval_records")):
            value = getattr(args, name)
            if value is not None:
                if value < 1:
                    raise ValueError(f"{flag} must be >= 1, got {value}.")
                validation[name] = value
        config = RecipeConfig(output_dir=args.out, threads=args.threads, stage2_init=args.stage2_init, **validation)
        config = config.scaled(args.steps_scale)
        if args.stage2_steps is not None:
            if args.stage2_steps < 1:
                raise ValueError(f"--stage2-steps must be >= 1, got {args.stage2_steps}.")
            config.stage2_steps = args.stage2_steps
        if args.compressor_steps is not None:
            if args.compressor_steps < 1:
                raise ValueError(f"--compressor-steps must be >= 1, got {args.compressor_steps}.")
            config.compressor_steps = args.compressor_steps
        if args.choice_orders is not None:
            if not 1 <= args.choice_orders <= MAX_CHOICE_ORDERS:
                raise ValueError(f"--choice-orders must be in [1, {MAX_CHOICE_ORDERS}], got {args.choice_orders}.")
            config.multiturn_choice_orders = args.choice_orders
        done = run_recipe(config, only=args.only)
    except (ValueError, FileNotFoundError) as error:
        print(f"divico retrain-default: {error}")
        return 2
    for name, path in done.items():
        print(f"{name}: {path}")
    if args.export:
        print(f"exported to {export_assets(args.out)}")
    if args.curves is not None:
        plot, table = write_learning_curves(args.out, args.curves)
        print(f"wrote {plot} and {table}")
    return 0
