"""`divico demo`: the paper's Tables I and III on the trained default model, offline on a CPU."""

from __future__ import annotations

import argparse
from pathlib import Path

from divico_testbed.data import DEFAULT_TEST_GROUPS
from divico_testbed.demo import SCORE_DTYPES, TIMING_DTYPES, TRAINING_FREE_METHODS, DemoConfig, run_demo


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="Evaluate baseline / FastV / DeCo / DiViCo on the default model: tables like the paper's I and III.",
        description="Loads the trained default model and shipped checkpoints, evaluates every method at the "
        "paper's three rates on held-out test slices (or, with --full, the whole test splits), with bootstrap "
        "intervals, paired differences from FastV and DeCo, and fidelity to the uncompressed model; measures "
        "FLOPs, memory and prefill latency (interleaved rounds), prints the tables and writes a plot.",
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder (resumable)")
    parser.add_argument("--full", action="store_true",
                        help="score the whole test splits (--test-groups scoring groups per benchmark; hours on a CPU)")
    parser.add_argument("--limit", type=int, default=24,
                        help="scoring groups per benchmark of the slice (default 24; ignored with --full)")
    parser.add_argument("--test-groups", type=int, default=DEFAULT_TEST_GROUPS,
                        help=f"scoring groups per benchmark of the generated test splits (default {DEFAULT_TEST_GROUPS})")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--score-dtype", choices=SCORE_DTYPES, default="float32",
                        help="dtype of the scored answers (default float32: the same figures on every CPU)")
    parser.add_argument("--timing-dtype", choices=TIMING_DTYPES, default="auto",
                        help="dtype of the timing table (default auto: bfloat16 where the CPU has native bf16)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                        help="shorthand for the same --score-dtype and --timing-dtype (kept from earlier versions)")
    parser.add_argument("--timing-rounds", "--repeats", dest="timing_rounds", type=int, default=15,
                        help="interleaved timing rounds (default 15; --repeats is its earlier name)")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default 2000)")
    parser.add_argument("--ablation", action="store_true",
                        help="also evaluate the ablation runs: variant a (a trained FastV) at every rate, variant b "
                        "and DiViCo trained with the KL mean at 11.1%%")
    parser.add_argument("--methods", nargs="+", default=list(TRAINING_FREE_METHODS), metavar="METHOD",
                        help="training-free methods run at each rate beside the trained DeCo and DiViCo (default: "
                        "fastv; e.g. --methods fastv random pooling dart pdrop divprune visionzip)")
    parser.add_argument("--runs", nargs="+", default=None, metavar="RUN",
                        help="score only these runs (e.g. divico-keep11.1 deco-keep6.7; the baseline always runs): "
                        "processes with disjoint --runs and the same --out work in parallel once the baseline is "
                        "answered, and a last call without --runs writes the complete tables")
    parser.add_argument("--assets", type=Path, default=None, help="trained checkpoints (default: shipped)")
    parser.add_argument("--data", type=Path, default=None, help="mini-benchmark folder (generated if missing)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.dtype is not None:
        args.score_dtype = args.timing_dtype = args.dtype
    try:
        config = DemoConfig(
            out_dir=args.out, assets_dir=args.assets, data_dir=args.data, limit=None if args.full else args.limit,
            test_groups=args.test_groups, batch_size=args.batch_size, score_dtype=args.score_dtype,
            timing_dtype=args.timing_dtype, timing_rounds=args.timing_rounds, resamples=args.resamples,
            ablation=args.ablation, methods=tuple(args.methods), show_progress=not args.no_progress, threads=args.threads,
            runs=None if args.runs is None else tuple(args.runs),
        )
        run_demo(config)
    except (ValueError, FileNotFoundError) as error:
        print(f"divico demo: {error}")
        return 2
    return 0
