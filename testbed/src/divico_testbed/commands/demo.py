"""`divico demo`: the paper's Tables I and III on the trained default model, offline on a CPU."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from divico_testbed.demo import DemoConfig, demo_slice, run_demo


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="Evaluate baseline / FastV / DeCo / DiViCo on the default model: tables like the paper's I and III.",
        description="Loads the trained default model and shipped checkpoints, evaluates every method at the "
        "paper's three rates on held-out test slices, measures FLOPs, memory and prefill latency, prints "
        "Tables I and III and writes a plot.",
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder (resumable)")
    parser.add_argument("--full", action="store_true", help="evaluate the complete test splits (slow)")
    parser.add_argument("--limit", type=int, default=24, help="scoring groups per benchmark (default 24)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--repeats", type=int, default=3, help="timed prefill repeats")
    parser.add_argument("--ablation", action="store_true", help="also evaluate the Fig. 8 variants a and b")
    parser.add_argument("--assets", type=Path, default=None, help="trained checkpoints (default: shipped)")
    parser.add_argument("--data", type=Path, default=None, help="mini-benchmark folder (generated if missing)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--slice-out", type=Path, default=None,
                        help="only compute the small deterministic slice that tests check, and write it here")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.slice_out is not None:
        result = demo_slice(assets_dir=args.assets, data_dir=args.data, show_progress=not args.no_progress)
        args.slice_out.parent.mkdir(parents=True, exist_ok=True)
        args.slice_out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        print(json.dumps(result, indent=2))
        return 0
    try:
        config = DemoConfig(
            out_dir=args.out, assets_dir=args.assets, data_dir=args.data, limit=None if args.full else args.limit,
            batch_size=args.batch_size, dtype=args.dtype, repeats=args.repeats, ablation=args.ablation,
            show_progress=not args.no_progress,
        )
        run_demo(config)
    except (ValueError, FileNotFoundError) as error:
        print(f"divico demo: {error}")
        return 2
    return 0
