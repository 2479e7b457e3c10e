"""Control: how fast does the default model learn the mini-benchmarks when its visual tokens are PERFECTLY aligned?

    python experiments/oracle_visual_tokens.py --data DIR [--targets mean|split] [--steps 120] [--eval-at 40]

The projector's output is replaced (a forward hook) by the ground-truth word-embedding targets of every patch,
what :func:`divico_testbed.recipe.align_projector` trains the projector towards:

* ``mean``: each patch is the mean input embedding of its words (``red`` + ``square``; ``white`` + ``background``),
  exactly :func:`divico_testbed.recipe.scene_patch_targets`;
* ``split``: each patch is ONE word's embedding, so an object reads like text in raster order: in each row of an
  object's patches the first is its colour word and the rest its shape word (``... background red square square
  background ...``), a sign's patches ``<colour> sign sign``, background patches ``background``.

Everything else is the real stage-2 setting: the multi-turn conversations with images, the LLaVA chat template
and its 144 ``<image>`` positions, LoRA r=16 on all LLM linear layers, batch 4, lr 1e-3, bf16 autocast. Exact match
of greedy answers on the first test questions of POPE, GQA, MME and TextVQA is printed before and after training
(and after each ``--eval-at`` step). Compared with ``text_scene_control.py`` (the scene as a caption) it says
whether visual tokens that ARE word embeddings, in raster order, are read like text; compared with the trained
default model it says how much of the gap the projector's alignment accounts for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from divico_testbed.data import load_scenes
from divico.training.data import LlavaJsonDataset
from divico_testbed.default_model import build_default_model
from divico_testbed.recipe import scene_patch_targets, scene_patch_words
from quick_exact_match import exact_match_scores, first_test_records
from text_scene_control import add_lora, control_parser, parse_control_args, train_lora_steps

def split_word_targets(model: Any, tokenizer: Any, scene: Any, grid: int) -> torch.Tensor:
    """One word embedding per patch (see the module docstring), shape (grid * grid, D)."""
    patches = scene_patch_words(scene, grid)
    embeddings = model.get_input_embeddings().weight.float()

    def embedding(word: str) -> torch.Tensor:
        ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        return embeddings[ids[0]]

    out = []
    for index, (words, on_item) in enumerate(patches):
        if not on_item:
            out.append(embedding("background"))
            continue
        left = patches[index - 1] if index % grid else None
        first_in_row = left is None or left != (words, True)
        out.append(embedding(words[0] if first_in_row else words[-1]))
    return torch.stack(out)


class OracleProjector:
    """Forward hook that replaces the projector's output with the targets of the batch's scenes."""

    def __init__(self, model: Any, tokenizer: Any, scenes: dict[str, Any], mode: str) -> None:
        self.model, self.tokenizer, self.scenes, self.mode = model, tokenizer, scenes, mode
        self.grid = round(model.config.image_seq_length**0.5)
        self.cache: dict[str, torch.Tensor] = {}
        self.current: torch.Tensor | None = None

    def targets(self, image: str) -> torch.Tensor:
        if image not in self.cache:
            scene = self.scenes[image]
            with torch.no_grad():
                if self.mode == "mean":
                    self.cache[image] = scene_patch_targets(self.model, self.tokenizer, scene, self.grid)[0]
                else:
                    self.cache[image] = split_word_targets(self.model, self.tokenizer, scene, self.grid)
        return self.cache[image]

    def use(self, images: list[str]) -> None:
        self.current = torch.stack([self.targets(image) for image in images])

    def __call__(self, module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        if self.current is None or self.current.shape[:2] != output.shape[:2]:
            raise RuntimeError(f"oracle targets {None if self.current is None else tuple(self.current.shape)} "
                               f"do not match the projector output {tuple(output.shape)}")
        return self.current.to(output.dtype)


def main() -> None:
    parser = control_parser(__doc__.splitlines()[0], steps=120, out="runs/oracle-visual-tokens")
    parser.add_argument("--targets", choices=("mean", "split"), default="mean")
    args = parse_control_args(parser)
    torch.manual_seed(0)
    model, processor = build_default_model()
    scenes = {**load_scenes(args.data, "train"), **load_scenes(args.data, "test")}
    oracle = OracleProjector(model, processor.tokenizer, scenes, args.targets)
    model.model.multi_modal_projector.register_forward_hook(oracle)
    args.out.mkdir(parents=True, exist_ok=True)
    add_lora(model, args.data / args.turns_file, args.out)
    rows = first_test_records(args.data, args.eval_questions)

    def report(step: int) -> None:
        model.eval()
        scores = exact_match_scores(model, processor, args.data, rows,
                                    before_batch=lambda chunk: oracle.use([row["image"] for row in chunk]))
        print(f"after {step} steps: exact match % {scores}", flush=True)
        model.train()

    report(0)
    dataset = LlavaJsonDataset(args.data / args.turns_file, processor, image_folder=args.data)
    images = [str(Path(record.image_paths[0]).relative_to(args.data)) for record in dataset.records]
    train_lora_steps(model, dataset, processor, args.steps, args.eval_at, report,
                     before_forward=lambda indices: oracle.use([images[i] for i in indices]))

if __name__ == "__main__":
    main()
