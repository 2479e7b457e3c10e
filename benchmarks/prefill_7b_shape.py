"""Target 1: prefill latency ratio vs analytic FLOPs ratio, and compressor overhead.

LLaVA-1.5-7B shapes with random weights, LLM truncated to 4 decoder layers (per-layer extrapolation to
32 in results.json), 576 visual + 60 text tokens, K=2, keep 64, all methods plus the FastV reference.

    python benchmarks/prefill_7b_shape.py --dtype fp32 --out runs/prefill_7b_fp32
    python benchmarks/prefill_7b_shape.py --dtype bf16 --out runs/prefill_7b_bf16
"""

from __future__ import annotations

import argparse
import shlex
import sys

from divico.cli import main


def command(dtype: str, out: str, repeats: int, warmup: int) -> list[str]:
    return ["bench", "--model", "llava-1.5-7b", "--layers", "4", "--methods", "none,fastv,divico,deco",
            "--keep-tokens", "64", "--layer-k", "2", "--dtype", dtype, "--batch-size", "1",
            "--visual-tokens", "576", "--text-tokens", "60", "--repeats", str(repeats), "--warmup", str(warmup),
            "--reference-fastv", "--out", out]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--out", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    argv = command(args.dtype, args.out or f"runs/prefill_7b_{args.dtype}", args.repeats, args.warmup)
    print("divico " + shlex.join(argv), flush=True)
    sys.exit(main(argv))
