"""Control: how fast does the default model's LLM learn the mini-benchmark questions when the scene is TEXT?

    python experiments/text_scene_control.py --data DIR [--steps 40] [--eval-questions 48]

The image is replaced by the scene's ground-truth caption ("Scene: An image with 4 shapes ... At the top there is
a black square. ..."), so nothing has to be read from visual tokens. SmolLM2-135M (the default model's LLM, no
vision) gets LoRA r=16 on all linear layers and is trained on the stage-2 multi-turn conversations in that form
(caption turns dropped, they would give the scene away), batch 4, lr 1e-3, bf16 autocast. Exact-match accuracy of
greedy answers (``divico.metrics.exact_match_accuracy``) on the first test questions of POPE, GQA, MME and
TextVQA is printed before and after training (and after each ``--eval-at`` step).
It separates the two halves of the default model's problem: reading the visual tokens vs. learning to answer.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from divico.api import remove_compression
from divico.config import CompressionConfig
from divico_testbed.data import load_scenes
from divico_testbed.data.benchmarks import build_prompt
from divico.training.data import LeftPaddingCollator, LlavaJsonDataset, pad_token_id_of
from divico.training.trainer import TrainingConfig, prepare_model_for_training
from divico_testbed.default_model import build_default_model
from quick_exact_match import BENCHMARKS, exact_match_percent, first_test_records

def text_conversations(data: Path, scenes: dict[str, Any], turns_file: str) -> list[dict[str, Any]]:
    """The multi-turn training file with ``<image>`` replaced by the scene caption and caption turns dropped."""
    records = json.loads((data / turns_file).read_text())
    out = []
    for record in records:
        conversation = record["conversations"]
        pairs = [(conversation[i], conversation[i + 1]) for i in range(0, len(conversation), 2)]
        pairs = [(human, gpt) for human, gpt in pairs if "Describe the image" not in human["value"]]
        turns: list[dict[str, str]] = []
        for index, (human, gpt) in enumerate(pairs):
            question = human["value"].replace("<image>\n", "").replace("<image>", "")
            if index == 0:
                question = scene_text(scenes, record["image"]) + "\n" + question
            turns += [{"from": "human", "value": question}, gpt]
        if turns:
            out.append({"id": record["id"], "conversations": turns})
    return out


def scene_text(scenes: dict[str, Any], image: str) -> str:
    return "Scene: " + scenes[image].describe()


def text_scene_predictions(model: Any, tokenizer: Any, scenes: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """Greedy answers (at most 6 new tokens, bf16 autocast) to ``<scene text>\n<prompt>`` for each eval row."""
    predictions = []
    with torch.no_grad():
        for row in rows:
            content = [{"type": "text", "text": scene_text(scenes, row["image"]) + "\n" + build_prompt(row)}]
            inputs = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                   return_tensors="pt", return_dict=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
            predictions.append(tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return predictions


def exact_match(model: Any, tokenizer: Any, scenes: dict[str, Any], rows: list[dict[str, Any]]) -> float:
    return exact_match_percent(text_scene_predictions(model, tokenizer, scenes, rows), rows)


def control_parser(description: str, steps: int, out: str) -> argparse.ArgumentParser:
    """The controls' shared options: data, turns file, steps, evaluation points and size, output folder."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", type=Path, required=True, help="a `divico make-data` folder with the multi-turn file")
    parser.add_argument("--turns-file", default="llava_train_multiturn8.json")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--eval-at", type=int, nargs="*", default=[],
                        help="also report after these steps (before and after training always)")
    parser.add_argument("--eval-questions", type=int, default=48)
    parser.add_argument("--out", type=Path, default=Path(out))
    parser.add_argument("--mmbench", action="store_true",
                        help="also score MMBench records (question x option order) by exact match of the letter")
    return parser


def parse_control_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    args = parser.parse_args()
    if args.steps < 0 or args.eval_questions < 1:
        parser.error(f"--steps must be >= 0 and --eval-questions >= 1, got {args.steps} and {args.eval_questions}")
    if any(not 0 < step < args.steps for step in args.eval_at):
        parser.error(f"--eval-at steps must be in (0, {args.steps}), got {args.eval_at}")
    return args


def add_lora(model: Any, data_path: Path, out: Path) -> None:
    """LoRA r=16 (alpha 32, no dropout) on every LLM linear layer; only LoRA is trained."""
    # DeCo at keep 1.0 is the identity: prepare_model_for_training only adds LoRA here.
    config = TrainingConfig(data_path=data_path, output_dir=out, lora_r=16, lora_alpha=32, lora_dropout=0.0,
                            compression=CompressionConfig("deco", keep_ratio=1.0))
    prepare_model_for_training(model, config)
    remove_compression(model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name)


def train_lora_steps(
    model: Any, dataset: LlavaJsonDataset, processor: Any, steps: int, eval_at: list[int],
    report: Callable[[int], None], before_forward: Callable[[list[int]], None] | None = None,
) -> None:
    """The controls' loop: batch 4 in a fixed shuffled order, AdamW lr 1e-3 (constant), bf16 autocast, clip 1.0.

    ``before_forward(indices)`` is called with the batch's dataset indices before each forward; ``report(step)``
    after each step in ``eval_at`` and after the last.
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    collate = LeftPaddingCollator(pad_token_id_of(processor))
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=0.0)
    order = list(range(len(dataset)))
    random.Random(0).shuffle(order)
    started = time.perf_counter()
    model.train()
    for step in range(steps):
        indices = [order[(step * 4 + j) % len(order)] for j in range(4)]
        batch = collate([dataset[i] for i in indices])
        if before_forward is not None:
            before_forward(indices)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        if step % 5 == 4:
            print(f"step {step + 1} loss {float(loss.detach()):.3f} "
                  f"{(time.perf_counter() - started) / (step + 1):.1f} s/step", flush=True)
        if step + 1 in eval_at:
            report(step + 1)
    report(steps)


def main() -> None:
    parser = control_parser(__doc__.splitlines()[0], steps=40, out="runs/text-scene-control")
    args = parse_control_args(parser)
    torch.manual_seed(0)
    model, processor = build_default_model()
    scenes = {**load_scenes(args.data, "train"), **load_scenes(args.data, "test")}
    args.out.mkdir(parents=True, exist_ok=True)
    train_file = args.out / "text_train.json"
    train_file.write_text(json.dumps(text_conversations(args.data, scenes, args.turns_file)))
    add_lora(model, train_file, args.out)
    tokenizer = processor.tokenizer
    rows = first_test_records(args.data, args.eval_questions, (*BENCHMARKS, "mmbench") if args.mmbench else BENCHMARKS)

    def report(step: int) -> None:
        model.eval()
        scores = {b: exact_match(model, tokenizer, scenes, records) for b, records in rows.items()}
        print(f"after {step} steps: exact match % {scores}", flush=True)
        model.train()

    report(0)
    train_lora_steps(model, LlavaJsonDataset(train_file, processor), processor, args.steps, args.eval_at, report)

if __name__ == "__main__":
    main()
