"""How well a trained default model reads sign text: exact match on the TextVQA-style sign questions of a split.

    python experiments/sign_reading.py --data DIR [--stage ASSETS_OR_STAGE2_DIR ...] [--split validation]

Asks every ``ocr`` record of ``<data>/textvqa/<split>.jsonl`` (greedy answers, at most 6 new tokens, bf16
autocast, the yardstick of ``quick_exact_match.py``) and reports exact match separately for signs that show one
of the common words (``divico_testbed.data.scenes.SIGN_WORDS``) and for random letter/digit strings, with the most
frequent answers (a model that has not learnt to read answers one common word to everything). Several
``--stage`` folders are compared side by side on the same questions. Uncompressed; ~1 min per stage on 2 CPU
cores for the validation split's ~70 questions.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from quick_exact_match import exact_match_percent, greedy_predictions, resolve_stage

from divico_testbed.data import load_eval_records
from divico_testbed.data.scenes import SIGN_WORDS
from divico_testbed.recipe import ASSETS_DIR, load_base


def sign_records(data: Path, split: str) -> dict[str, list[dict]]:
    """The ``ocr`` records of the TextVQA-style set, grouped as ``{"word": [...], "string": [...]}``."""
    groups: dict[str, list[dict]] = {"word": [], "string": []}
    for row in load_eval_records(data, "textvqa", split):
        if row.get("category") == "ocr":
            groups["word" if row["answers"][0].upper() in SIGN_WORDS else "string"].append(row)
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a `divico make-data` folder (seed 0)")
    parser.add_argument("--stage", type=Path, nargs="+", default=[ASSETS_DIR])
    parser.add_argument("--split", choices=("validation", "test"), default="validation")
    args = parser.parse_args()
    groups = sign_records(args.data, args.split)
    print(f"{args.split}: {len(groups['word'])} common-word signs, {len(groups['string'])} random strings")
    for stage_path in args.stage:
        stage = resolve_stage(stage_path)
        model, processor = load_base(stage)
        parts = []
        for group, records in groups.items():
            predictions = greedy_predictions(model, processor, args.data, records)
            common = ", ".join(f"{answer!r} x{count}" for answer, count in Counter(predictions).most_common(3))
            parts.append(f"{group} {exact_match_percent(predictions, records)} (most frequent: {common})")
        print(f"{stage}: exact match % " + "; ".join(parts))


if __name__ == "__main__":
    main()
