"""`divico generate`: answer one prompt about one or more images (or a video), with or without compression."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from divico.api import get_runtime
from divico.cli_options import (
    add_inference_compression_arguments,
    add_model_arguments,
    configuration_from_args,
    resolve_device,
    resolve_dtype,
)
from divico.evaluation.generation import GenerationTimings, generate_batch
from divico.evaluation.runner import configured
from divico.models import load_model_and_processor
from divico.training.trainer import PAPER_KEEP_RATIO
from divico.video import read_video_frames


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="answer a prompt about images with a (compressed) model; --compare shows the uncompressed answer too",
        description=(
            "Greedy answer to --prompt about --image files (shown in order before the prompt) or a --video. Prints the "
            "answer, the visual tokens kept out of how many, and the prefill time (time to first token). Example: "
            "divico generate --model default --image photo.jpg --prompt 'What is in the image?' --method divico "
            "--keep-ratio 0.111 --compare"
        ),
    )
    add_model_arguments(parser)
    add_inference_compression_arguments(parser)
    parser.add_argument("--image", nargs="+", type=Path, default=[], metavar="IMG", help="image files, in order")
    parser.add_argument("--video", type=Path, default=None, metavar="FILE",
                        help="a video file (for video models such as Video-LLaVA or Qwen2-VL)")
    parser.add_argument("--num-frames", type=int, default=8, help="frames sampled from --video (default 8)")
    parser.add_argument("--prompt", required=True, help="the question or instruction")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="generation budget (default 64)")
    parser.add_argument("--compare", action="store_true",
                        help="also answer with the uncompressed model and print both answers")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        configuration = configuration_from_args(args, default_keep_ratio=PAPER_KEEP_RATIO)
        if args.compare and configuration.is_baseline:
            raise ValueError("--compare needs a compression (--method or --compressor) to compare with.")
        if not args.image and args.video is None:
            raise ValueError("Give --image IMG [IMG ...] or --video FILE.")
        images = []
        for path in args.image:
            if not path.is_file():
                raise FileNotFoundError(f"No image file at {path}.")
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        video: np.ndarray | None = None if args.video is None else read_video_frames(args.video, args.num_frames)
        model, processor = load_model_and_processor(args.model, resolve_dtype(args.dtype))
        model.to(resolve_device(args.device)).eval()
        videos = None if video is None else [video]
        timings = GenerationTimings()
        with configured(model, configuration):
            if args.compare:  # one untimed warm-up, so the first timed prefill is not the only cold one
                generate_batch(model, processor, [args.prompt], [images], videos, max_new_tokens=1)
            (answer,) = generate_batch(model, processor, [args.prompt], [images], videos,
                                       max_new_tokens=args.max_new_tokens, timings=timings)
            runtime = get_runtime(model)
            report = None if runtime is None else runtime.report
        baseline_timings = GenerationTimings()
        if args.compare:
            (baseline_answer,) = generate_batch(model, processor, [args.prompt], [images], videos,
                                                max_new_tokens=args.max_new_tokens, timings=baseline_timings)
    except (FileNotFoundError, ValueError, TypeError) as error:
        print(f"divico generate: {error}", file=sys.stderr)
        return 2
    label = configuration.name
    print(f"answer ({label}): {answer}")
    if report is not None:
        kept, total = int(report.num_kept.sum()), int(report.num_visual.sum())
        print(f"visual tokens: {kept} kept of {total} ({report.method}, layer {report.layer})")
    else:
        print("visual tokens: all kept (uncompressed)")
    print(f"prefill: {timings.prefill_ms_per_batch:.1f} ms")
    if args.compare:
        print(f"answer (uncompressed): {baseline_answer}")
        print(f"prefill (uncompressed): {baseline_timings.prefill_ms_per_batch:.1f} ms")
    return 0
