"""`divico eval`: answer the paper's benchmarks from their official files, score them with the official rules."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from divico.cli_options import (
    add_inference_compression_arguments,
    add_model_arguments,
    add_noise_arguments,
    configuration_from_args,
    noise_from_args,
    resolve_device,
    resolve_dtype,
)
from divico.evaluation.benchmark import Benchmark, available_benchmarks, get_benchmark
from divico.evaluation.judge import make_judge
from divico.evaluation.runner import (
    TABLE_NAME,
    EvalConfiguration,
    compare_configurations,
    configured,
    evaluate_benchmark,
    format_comparison_table,
    process_state,
)
from divico.models import load_model_and_processor
from divico.training.trainer import PAPER_KEEP_RATIO

COMPARE_HELP = (
    "evaluate several configurations with one model load, into OUT/<name>/<benchmark>/, and print a Table-I-style "
    "comparison (also OUT/table.md). Each CONFIG is: 'baseline' (uncompressed); METHOD:KEEP[:OPTION...] with KEEP a "
    "keep ratio with a decimal point (0.111) or a token count (64) and OPTIONs layer=K, encoder=E, compressor=DIR or "
    "a bare DIR; or a trained compressor DIR alone (its saved method, rate and layer); any of them prefixed LABEL= "
    "to name it. Example: --compare baseline fastv:0.111 divico:0.111:runs/divico. The 'Improvement' row of a rate "
    "compares the last configuration of that rate with the best of the others: list yours last."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate on the paper's benchmarks (official files and scoring rules), resumable and data-parallel",
        description=(
            "Answer benchmark questions with LLaVA-1.5's evaluation prompts and greedy decoding, append every answer "
            "to OUT/<benchmark>/predictions.jsonl as it is produced, and write OUT/<benchmark>/scores.json (scores, "
            "prefill/decode latency, throughput, configuration). Rerunning the same command resumes: only questions "
            "without an answer are asked. Data parallel: accelerate launch --multi_gpu --num_processes N -m divico.cli eval ... (also on CPUs; or torchrun --nproc_per_node N -m divico.cli eval ...) "
            "(process r answers every N-th question; the main process merges and scores)."
        ),
    )
    add_model_arguments(parser)
    add_inference_compression_arguments(parser)
    add_noise_arguments(parser)
    parser.add_argument("--benchmark", nargs="+", required=True, choices=available_benchmarks(), metavar="NAME",
                        help=f"benchmarks to run: {', '.join(available_benchmarks())}")
    parser.add_argument("--data-root", type=Path, required=True, metavar="DIR",
                        help="folder holding the benchmarks' folders (LLaVA-1.5's playground/data/eval layout)")
    parser.add_argument("--split", nargs="+", default=[], metavar="BENCHMARK=SPLIT",
                        help="split of a benchmark, e.g. pope=adversarial (default: each benchmark's default)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="answer only the first N questions of each benchmark")
    parser.add_argument("--batch-size", type=int, default=1, help="questions per generate call (default 1)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="generation budget (default: each benchmark's, as LLaVA-1.5's scripts)")
    parser.add_argument("--compare", nargs="+", default=None, metavar="CONFIG", help=COMPARE_HELP)
    parser.add_argument("--judge-url", default=None, metavar="URL",
                        help="OpenAI-compatible endpoint of the video-QA judge, e.g. http://localhost:8000/v1")
    parser.add_argument("--judge-model", default=None, metavar="NAME", help="model name to request from --judge-url")
    parser.add_argument("--judge-key-env", default="OPENAI_API_KEY", metavar="VAR",
                        help="environment variable holding the judge endpoint's API key (default OPENAI_API_KEY)")
    parser.add_argument("--judge-local", default=None, metavar="MODEL",
                        help="a local transformers chat model (folder or hub id) as the video-QA judge")
    parser.add_argument("--judge-workers", type=int, default=1, help="parallel requests to the judge endpoint")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.set_defaults(func=run)


def parse_splits(pairs: list[str], benchmarks: list[str]) -> dict[str, str]:
    """``{benchmark: split}`` from ``BENCHMARK=SPLIT`` strings.

    Raises
    ------
    ValueError
        A pair without ``=`` or naming a benchmark that is not being run.
    """
    splits: dict[str, str] = {}
    for pair in pairs:
        name, sep, split = pair.partition("=")
        if not sep or not split:
            raise ValueError(f"--split expects BENCHMARK=SPLIT, got {pair!r}.")
        if name not in benchmarks:
            raise ValueError(f"--split {pair!r} names {name!r}, which is not among --benchmark {' '.join(benchmarks)}.")
        splits[name] = split
    return splits


def run(args: argparse.Namespace) -> int:
    state = process_state()
    try:
        if args.compare is not None and (args.method is not None or args.compressor is not None):
            raise ValueError("--compare lists the configurations itself; drop --method / --compressor.")
        configurations = ([EvalConfiguration.parse(spec, default_layer=args.layer) for spec in args.compare]
                          if args.compare is not None else [configuration_from_args(args, default_keep_ratio=PAPER_KEEP_RATIO)])
        noise = noise_from_args(args)
        configurations = [dataclasses.replace(c, noise=noise) for c in configurations]
        splits = parse_splits(args.split, args.benchmark)
        benchmarks: list[Benchmark] = [get_benchmark(name)(args.data_root, split=splits.get(name))
                                       for name in args.benchmark]
        judged = [b.name for b in benchmarks if b.needs_judge]
        if judged and args.judge_local is None and args.judge_url is None:
            raise ValueError(f"{', '.join(judged)} need an LLM judge: --judge-url URL --judge-model NAME (an "
                             "OpenAI-compatible endpoint) or --judge-local MODEL.")
        args.out.mkdir(parents=True, exist_ok=True)
        judge: Any = None
        if judged and state.is_main_process:
            judge = make_judge(url=args.judge_url, model=args.judge_model, local=args.judge_local,
                               cache=args.out / "judge_cache.jsonl", api_key_env=args.judge_key_env,
                               max_workers=args.judge_workers)
        model, processor = load_model_and_processor(args.model, resolve_dtype(args.dtype))
        model.to(resolve_device(args.device, state.device if state.num_processes > 1 else None)).eval()
        options: dict[str, Any] = dict(
            limit=args.limit, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, judge=judge,
            show_progress=not args.no_progress, run_info={"model_name": args.model},
        )
        if args.compare is not None:
            results = compare_configurations(model, processor, configurations, benchmarks, args.out, **options)
        else:
            (configuration,) = configurations
            run_info = {**options.pop("run_info"), **configuration.describe()}
            with configured(model, configuration):
                results = {configuration.name: {
                    b.name: evaluate_benchmark(model, processor, b, args.out, run_info=run_info, **options)
                    for b in benchmarks
                }}
    except (FileNotFoundError, ValueError, TypeError) as error:
        print(f"divico eval: {error}", file=sys.stderr)
        return 2
    if state.is_main_process:
        table = format_comparison_table(results, [b.name for b in benchmarks])
        if args.compare is None:
            (args.out / TABLE_NAME).write_text(table + "\n")
        print("\n" + table)
        for name, per_benchmark in results.items():
            for benchmark, result in per_benchmark.items():
                timings = result["timings"]
                folder = args.out / name / benchmark if args.compare is not None else args.out / benchmark
                print(f"{name} {benchmark}: score {result['scores'].get('score')}, n {result['scores'].get('n')}, "
                      f"prefill {_ms(timings['prefill_ms_per_batch'])}/batch, decode "
                      f"{_ms(timings['decode_ms_per_token'])}/token, {_rate(timings['tokens_per_second'])} "
                      f"({folder})")
                if result.get("submission"):
                    print(f"  no public answers: submit {result['submission']} to the evaluation server")
    return 0


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} tokens/s"
