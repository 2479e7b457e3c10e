"""Target 1: prefill latency ratio vs analytic FLOPs ratio, and compressor overhead.

LLaVA-1.5-7B shapes with random weights, LLM truncated to 4 decoder layers (per-layer extrapolation to
32 in results.json), 576 visual + 60 text tokens, K=2, keep 64, all methods plus the FastV reference.

    python benchmarks/prefill_7b_shape.py --dtype fp32 --out runs/prefill_7b_fp32
    python benchmarks/prefill_7b_shape.py --dtype bf16 --out runs/prefill_7b_bf16

DiViCo at several g_theta widths side by side (one divico row per width; docs/benchmarks.md, "DiViCo's overhead
and g_theta's width")::

    python benchmarks/prefill_7b_shape.py --dtype fp32 --methods none,fastv,divico --encoder-hidden-size 4096,512 \
        --no-reference-fastv --no-memory --repeats 6 --out runs/prefill_7b_widths
"""

from __future__ import annotations

import argparse
import shlex
import sys

from divico.cli import main


def command(dtype: str, out: str, repeats: int, warmup: int, methods: str = "none,fastv,divico,deco",
            encoder_hidden_size: str | None = None, reference_fastv: bool = True, memory: bool = True) -> list[str]:
    argv = ["bench", "--model", "llava-1.5-7b", "--layers", "4", "--methods", methods,
            "--keep-tokens", "64", "--layer-k", "2", "--dtype", dtype, "--batch-size", "1",
            "--visual-tokens", "576", "--text-tokens", "60", "--repeats", str(repeats), "--warmup", str(warmup)]
    if encoder_hidden_size:
        argv += ["--encoder-hidden-size", encoder_hidden_size]
    if reference_fastv:
        argv.append("--reference-fastv")
    if not memory:
        argv.append("--no-memory")
    return argv + ["--out", out]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--out", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--methods", default="none,fastv,divico,deco")
    parser.add_argument("--encoder-hidden-size", default=None,
                        help="DiViCo's g_theta width(s), e.g. 4096,512 (default: the library default)")
    parser.add_argument("--no-reference-fastv", action="store_true", help="skip the full-attention FastV row")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    args = parser.parse_args()
    argv = command(args.dtype, args.out or f"runs/prefill_7b_{args.dtype}", args.repeats, args.warmup, args.methods,
                   args.encoder_hidden_size, not args.no_reference_fastv, not args.no_memory)
    print("divico " + shlex.join(argv), flush=True)
    sys.exit(main(argv))
