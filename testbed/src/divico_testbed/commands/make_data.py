"""`divico make-data`: render the synthetic mini-benchmarks and LLaVA training conversations."""

from __future__ import annotations

import argparse
from typing import Any

from divico_testbed.data.benchmarks import DEFAULT_TEST_GROUPS, SMALL_SIZES, SPLITS, sizes_for_test_groups, write_benchmark_splits


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "make-data",
        help="generate synthetic VQAv2/POPE/MME/MMBench/GQA-style data and LLaVA files",
        description=(
            "Render synthetic scenes (coloured shapes on a 3x3 grid, short text signs) and write eval records "
            "per benchmark/split as JSONL plus LLaVA-format training conversations."
        ),
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    parser.add_argument("--image-size", type=int, default=168,
                        help="image side in pixels, >= 64 (default 168)")
    parser.add_argument("--test-groups", type=int, default=None,
                        help=f"scoring groups per benchmark in the test split (default {DEFAULT_TEST_GROUPS}; "
                        "with --small, the small preset's)")
    parser.add_argument("--small", action="store_true",
                        help="tiny sizes for tests and smoke runs")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    sizes = {split: dict(per_set) for split, per_set in SMALL_SIZES.items()} if args.small else {}
    try:
        if args.test_groups is not None:
            sizes["test"] = sizes_for_test_groups(args.test_groups)
        manifest = write_benchmark_splits(
            args.out,
            seed=args.seed,
            sizes=sizes or None,
            image_size=args.image_size,
            show_progress=not args.no_progress,
        )
    except ValueError as error:
        print(f"divico make-data: {error}")
        return 2
    counts = manifest["counts"]
    for split in SPLITS:
        per_set = ", ".join(f"{name} {n}" for name, n in counts[split].items())
        print(f"{split}: {per_set}")
    print(f"LLaVA conversations: train {counts['llava_train']}, "
          f"validation {counts['llava_validation']}")
    print(f"wrote {args.out}")
    return 0
