"""Exact match of a trained default model on the first test questions of POPE, GQA, MME and TextVQA.

    python experiments/quick_exact_match.py --data DIR [--stage ASSETS_OR_STAGE2_DIR] [--questions 48]

The same yardstick as ``text_scene_control.py`` and ``oracle_visual_tokens.py`` (greedy answers, at most 6 new
tokens, bf16 autocast, ``divico.metrics.exact_match_accuracy``; MME per question, not the paired score), so the
image-fed model can be put beside the two controls. ``--stage`` is a trained stage-2 folder or an assets folder
holding ``stage2/`` (default: the shipped assets). Uncompressed; about a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from divico_testbed.evaluation import answer_records
from divico.metrics import exact_match_accuracy
from divico_testbed.recipe import ASSETS_DIR, load_base

BENCHMARKS = ("pope", "gqa", "mme", "textvqa")


def first_test_records(
    data: Path, questions: int, benchmarks: tuple[str, ...] = BENCHMARKS,
) -> dict[str, list[dict[str, Any]]]:
    """The first ``questions`` test records of each of ``benchmarks`` (MMBench: records = question x option order,
    scored by exact match of the letter)."""
    return {b: [json.loads(line) for line in (data / b / "test.jsonl").open()][:questions] for b in benchmarks}


def resolve_stage(path: Path) -> Path:
    """A trained stage-2 folder: ``path`` itself, or its ``stage2/`` when ``path`` is an assets folder."""
    return path / "stage2" if (path / "stage2" / "config.json").is_file() else path


def exact_match_percent(predictions: list[str], rows: list[dict[str, Any]]) -> float:
    """Exact match against each record's answer (VQA-style records: their first answer), rounded to 0.1."""
    answers = [str(row.get("answer") or row["answers"][0]) for row in rows]
    return round(exact_match_accuracy(predictions, answers), 1)


def greedy_predictions(
    model: Any, processor: Any, data: Path, records: list[dict[str, Any]],
    before_batch: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[str]:
    """Greedy image-fed answers to ``records`` (batches of 16, bf16 autocast, <= 6 new tokens).

    ``before_batch(records)`` is called before each batch is answered.
    """
    predictions: list[str] = []
    for start in range(0, len(records), 16):
        chunk = records[start:start + 16]
        if before_batch is not None:
            before_batch(chunk)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            predictions += answer_records(model, processor, chunk, data, batch_size=16, max_new_tokens=6,
                                          show_progress=False)
    return predictions


def exact_match_scores(
    model: Any, processor: Any, data: Path, rows: dict[str, list[dict[str, Any]]],
    before_batch: Callable[[list[dict[str, Any]]], None] | None = None,
) -> dict[str, float]:
    """:func:`greedy_predictions` scored per benchmark by :func:`exact_match_percent`."""
    return {benchmark: exact_match_percent(greedy_predictions(model, processor, data, records, before_batch), records)
            for benchmark, records in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a `divico make-data` folder (seed 0)")
    parser.add_argument("--stage", type=Path, default=ASSETS_DIR)
    parser.add_argument("--questions", type=int, default=48)
    args = parser.parse_args()
    if args.questions < 1:
        parser.error(f"--questions must be >= 1, got {args.questions}")
    stage = resolve_stage(args.stage)
    model, processor = load_base(stage)
    scores = exact_match_scores(model, processor, args.data, first_test_records(args.data, args.questions))
    print(f"{stage}: exact match % {scores}")


if __name__ == "__main__":
    main()
