"""Target 2: divico vs the full-attention FastV reference at 2048 visual tokens (prefill time, peak memory,
KV cache of layers >= K) and per-token decode at that context length.

LLaVA-1.5-7B shapes, LLM truncated to 3 decoder layers, 2048 visual tokens (two 32x32 patch grids, i.e. two
448-px images) + 60 text tokens, K=2, keep 228 (the paper's 11.1%).

    python benchmarks/long_context_2048.py --dtype bf16 --out runs/long_2048_bf16
"""

from __future__ import annotations

import argparse
import shlex
import sys

from divico.cli import main


def command(dtype: str, out: str, repeats: int, warmup: int, decode_tokens: int) -> list[str]:
    return ["bench", "--model", "llava-1.5-7b", "--layers", "3", "--methods", "none,fastv,divico",
            "--keep-ratios", "0.111", "--layer-k", "2", "--dtype", dtype, "--batch-size", "1",
            "--visual-tokens", "2048", "--text-tokens", "60", "--repeats", str(repeats), "--warmup", str(warmup),
            "--reference-fastv", "--decode-tokens", str(decode_tokens), "--out", out]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--out", default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--decode-tokens", type=int, default=6)
    args = parser.parse_args()
    argv = command(args.dtype, args.out or f"runs/long_2048_{args.dtype}", args.repeats, args.warmup,
                   args.decode_tokens)
    print("divico " + shlex.join(argv), flush=True)
    sys.exit(main(argv))
