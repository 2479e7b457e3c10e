"""Exact match of a trained default model on the first test questions of POPE, GQA, MME and TextVQA.

    python benchmarks/quick_exact_match.py --data DIR [--stage ASSETS_OR_STAGE2_DIR] [--questions 48]

The same yardstick as ``text_scene_control.py`` and ``oracle_visual_tokens.py`` (greedy answers, at most 6 new
tokens, bf16 autocast, ``divico.metrics.exact_match_accuracy``; MME per question, not the paired score), so the
image-fed model can be put beside the two controls. ``--stage`` is a trained stage-2 folder or an assets folder
holding ``stage2/`` (default: the shipped assets). Uncompressed; about a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from divico.evaluation.runner import answer_records
from divico.metrics import exact_match_accuracy
from divico.zoo.recipe import ASSETS_DIR, load_base

BENCHMARKS = ("pope", "gqa", "mme", "textvqa")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a `divico make-data` folder (seed 0)")
    parser.add_argument("--stage", type=Path, default=ASSETS_DIR)
    parser.add_argument("--questions", type=int, default=48)
    args = parser.parse_args()
    if args.questions < 1:
        parser.error(f"--questions must be >= 1, got {args.questions}")
    stage = args.stage / "stage2" if (args.stage / "stage2" / "config.json").is_file() else args.stage
    model, processor = load_base(stage)
    scores = {}
    for benchmark in BENCHMARKS:
        rows = [json.loads(line) for line in (args.data / benchmark / "test.jsonl").open()][: args.questions]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            predictions = answer_records(model, processor, rows, args.data, batch_size=16, max_new_tokens=6,
                                         show_progress=False)
        answers = [str(row.get("answer") or row["answers"][0]) for row in rows]
        scores[benchmark] = round(exact_match_accuracy(predictions, answers), 1)
    print(f"{stage}: exact match % {scores}")


if __name__ == "__main__":
    main()
