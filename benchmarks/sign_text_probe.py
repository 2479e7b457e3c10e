"""Is sign text readable from the default model's visual tokens? A linear probe on the vision features.

    python benchmarks/sign_text_probe.py [--scenes 1500] [--font-scale 0.085 ...] [--stage ASSETS_OR_STAGE2_DIR]

Renders ``--scenes`` scenes with one or two signs (seeds outside every benchmark split) at each ``--font-scale``
(share of the image side; the benchmarks use ``divico_testbed.data.scenes.SIGN_FONT_SCALE``), takes the features the
projector reads (DINOv2 block 7, ``VISION_FEATURE_LAYER``) and, with ``--stage``, also the trained projector's
output (the LLM's visual tokens). A ridge classifier (dual form, lambda 100, features standardised) is fitted on
80% of the signs and scored on the other 20%, for two targets:

* ``word``: which of the 46 common words (``SIGN_WORDS``) a word sign shows (chance ~4%);
* ``first char``: the first character of a random letter/digit string (30 classes, chance ~5%),

each from the single patch under the sign's centre (what one visual token holds) and from the 4 x 4 patches of
the sign's grid cell concatenated (an upper bound for what attention over the cell could combine). ~75 s of
feature extraction per font scale on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch
from quick_exact_match import resolve_stage

from divico_testbed.data.scenes import _SIGN_ALPHABET, GRID_SIZE, SIGN_FONT_SCALE, SIGN_WORDS, generate_scene, render_scene
from divico_testbed.default_model import VISION_FEATURE_LAYER, build_default_model, num_visual_tokens
from divico_testbed.recipe import load_base

# Scene seeds far from every benchmark split's (those are < 1.5e8 for seeds 0-2).
PROBE_SEED_BASE = 10_000_000_000


def ridge_accuracy(features: torch.Tensor, labels: torch.Tensor, classes: int, lam: float = 100.0) -> float:
    """Held-out (last 20%) accuracy of a ridge classifier on standardised ``features`` (N, D), ``labels`` (N,)."""
    split = int(0.8 * len(labels))
    x = features.double()
    x = (x - x[:split].mean(0)) / (x[:split].std(0) + 1e-6)
    targets = torch.nn.functional.one_hot(labels[:split], classes).double()
    gram = x[:split] @ x[:split].T  # dual form: N << D
    weights = torch.linalg.solve(gram + lam * torch.eye(split, dtype=torch.float64), targets)
    predicted = (x[split:] @ x[:split].T @ weights).argmax(-1)
    return float((predicted == labels[split:]).double().mean())


def sign_features(grid_features: torch.Tensor, scenes: list) -> dict[str, tuple[list, list]]:
    """Per sign: (centre-patch vector, concatenated cell vector) and label, grouped by target."""
    grid = grid_features.shape[1]
    per_cell = grid // GRID_SIZE
    rows: dict[str, tuple[list, list]] = {"word": ([], []), "first char": ([], [])}
    for features, scene in zip(grid_features, scenes, strict=True):
        for sign in scene.signs:
            centre = features[min(int(sign.y * grid), grid - 1), min(int(sign.x * grid), grid - 1)]
            cell = features[sign.row * per_cell:(sign.row + 1) * per_cell,
                            sign.col * per_cell:(sign.col + 1) * per_cell].reshape(-1)
            if sign.text in SIGN_WORDS:
                target, label = "word", SIGN_WORDS.index(sign.text)
            else:
                target, label = "first char", _SIGN_ALPHABET.index(sign.text[0])
            rows[target][0].append((centre, cell))
            rows[target][1].append(label)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=1500)
    parser.add_argument("--font-scale", type=float, nargs="+", default=[SIGN_FONT_SCALE])
    parser.add_argument("--stage", type=Path, default=None,
                        help="also probe this trained stage 2's projector output (a stage-2 or assets folder)")
    args = parser.parse_args()
    if args.scenes < 50:
        parser.error(f"--scenes must be >= 50, got {args.scenes}")
    model, processor = build_default_model()
    projector = None
    if args.stage is not None:
        projector = load_base(resolve_stage(args.stage))[0].model.multi_modal_projector
    grid = round(num_visual_tokens() ** 0.5)
    scenes = [generate_scene(PROBE_SEED_BASE + index, sign_count_weights=(0.0, 0.5, 0.5))
              for index in range(args.scenes)]
    random.Random(0).shuffle(scenes)
    classes = {"word": len(SIGN_WORDS), "first char": len(_SIGN_ALPHABET)}
    for scale in args.font_scale:
        batches = []
        with torch.no_grad():
            for start in range(0, len(scenes), 32):
                images = [render_scene(s, sign_font_scale=scale) for s in scenes[start:start + 32]]
                pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
                hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
                batches.append(hidden[VISION_FEATURE_LAYER][:, 1:])
        raw = torch.cat(batches)
        spaces = {"vision features": raw}
        if projector is not None:
            with torch.no_grad():
                spaces["visual tokens"] = projector(raw)
        for space, features in spaces.items():
            rows = sign_features(features.reshape(len(scenes), grid, grid, -1), scenes)
            for target, (vectors, labels) in rows.items():
                label_tensor = torch.tensor(labels)
                centre = ridge_accuracy(torch.stack([v[0] for v in vectors]), label_tensor, classes[target])
                cell = ridge_accuracy(torch.stack([v[1] for v in vectors]), label_tensor, classes[target])
                print(f"font {scale:g} {space:16s} {target:10s} n={len(labels):4d} "
                      f"centre patch {100 * centre:5.1f}%  cell {100 * cell:5.1f}%  "
                      f"(chance {100 * label_tensor.bincount().max().item() / len(labels):.1f}%)")


if __name__ == "__main__":
    main()
