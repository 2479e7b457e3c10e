"""Which option does the default model pick? MMBench single-question accuracy per category.

    python experiments/option_letters.py --data DIR [--stage ASSETS_OR_STAGE2_DIR] [--rotations 160]
                                         [--text-scene | --short-answer]

MMBench's circular score counts a question only if all four rotations are right, so a model that answers by
letter prior (always "A") scores 0 even when it knows the content. This prints, on the first ``--rotations`` test
records (each a question in one option order): accuracy per category (chance 25%), the distribution of the option
letters the answers name (a letter, or an option's text, :func:`divico.metrics.extract_option_letter`), and the
circular score of the complete groups. ``--text-scene`` asks SmolLM2 alone (no LoRA, no image) with the scene's
ground-truth description in front of the prompt (``text_scene_control.py``'s prompt): can the LLM pick an option when it is *told* the content?
``--short-answer`` asks the image-fed model the bare question with the short-answer hint and no options, and maps
its answer to the option with that text: what the model knows, whatever its multiple-choice skill. Greedy
decoding, bf16 autocast, at most 6 new tokens; about a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import torch

from divico_testbed.data import load_scenes
from divico_testbed.evaluation import answer_records
from divico.metrics import extract_option_letter, mmbench_circular_accuracy
from divico_testbed.default_model import build_default_model
from divico_testbed.recipe import ASSETS_DIR, load_base
from quick_exact_match import first_test_records, resolve_stage
from text_scene_control import text_scene_predictions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a `divico make-data` folder")
    parser.add_argument("--stage", type=Path, default=ASSETS_DIR,
                        help="a trained stage-2 folder or an assets folder holding stage2/ (default: shipped)")
    parser.add_argument("--rotations", type=int, default=160, help="test records (question x option order)")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--text-scene", action="store_true", help="the bare LLM, told the scene as text")
    modes.add_argument("--short-answer", action="store_true",
                       help="the bare question without options; the answer is mapped to the option with its text")
    args = parser.parse_args()
    if args.rotations < 4 or args.rotations % 4:
        parser.error(f"--rotations must be a positive multiple of 4 (whole circular groups), got {args.rotations}")
    records = first_test_records(args.data, args.rotations, ("mmbench",))["mmbench"]
    if args.text_scene:
        model, processor = build_default_model()
        answers = text_scene_predictions(model, processor.tokenizer, load_scenes(args.data, "test"), records)
        source = "SmolLM2 alone, scene as text"
    else:
        stage = resolve_stage(args.stage)
        model, processor = load_base(stage)
        # A short-answer benchmark's prompt: the bare question and the short-answer hint, no options.
        queried = [{**r, "benchmark": "gqa"} for r in records] if args.short_answer else records
        with torch.autocast("cpu", dtype=torch.bfloat16):
            answers = answer_records(model, processor, queried, args.data, batch_size=16, max_new_tokens=6,
                                     show_progress=False)
        source = f"{stage}{' (short answers, no options)' if args.short_answer else ''}"
    right: Counter[str] = Counter()
    asked: Counter[str] = Counter()
    letters: Counter[str] = Counter()
    for record, answer in zip(records, answers):
        letter = extract_option_letter(answer, record["options"])
        letters[letter or "?"] += 1
        right[record["category"]] += letter == record["answer"]
        asked[record["category"]] += 1
    circular = mmbench_circular_accuracy(answers, [r["answer"] for r in records], [r["options"] for r in records],
                                         [r["circular_group"] for r in records], [r["rotation"] for r in records])
    correct = round(circular["score"] * circular["n_questions"] / 100)
    print(f"{source}: {len(records)} MMBench test records")
    print("per category (right/asked): " + ", ".join(f"{c} {right[c]}/{asked[c]}" for c in sorted(asked)))
    print(f"single-question accuracy {circular['per_question_accuracy']:.1f}% (chance 25%)")
    print("answer letters: " + ", ".join(f"{k} {v}" for k, v in sorted(letters.items())))
    print(f"circular: {correct}/{circular['n_questions']} groups")

if __name__ == "__main__":
    main()
