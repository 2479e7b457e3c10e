"""Which DINOv2 layer should the default model's projector read? A linear probe per layer.

    python benchmarks/feature_probe.py [--data DIR] [--scenes 500]

For each object of the first ``--scenes`` training scenes, the vision tower's hidden state at the patch under
the object's centre is taken from every layer (0 = patch embeddings, 12 = last block); a linear classifier per
layer is trained on 80% of the objects to predict the object's colour (8 classes) and shape (6 classes) and
scored on the other 20%. Prints held-out accuracies per layer; the default model reads the best layer
(``divico_testbed.default_model.VISION_FEATURE_LAYER``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image

from divico_testbed.data.scenes import COLORS, SHAPES
from divico_testbed.default_model import VISION_FEATURE_LAYER, build_default_model, default_cache_root


def probe_accuracy(features: torch.Tensor, labels: torch.Tensor, classes: int, train_share: float = 0.8) -> float:
    """Held-out accuracy of a linear classifier on standardised ``features`` (N, D) for ``labels`` (N,)."""
    split = int(train_share * len(labels))
    mean, std = features[:split].mean(0), features[:split].std(0) + 1e-5
    x = (features - mean) / std
    classifier = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(300):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(classifier(x[:split]), labels[:split]).backward()
        optimizer.step()
    with torch.no_grad():
        return float((classifier(x[split:]).argmax(-1) == labels[split:]).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=default_cache_root() / "demo-data",
                        help="a `divico make-data` folder")
    parser.add_argument("--scenes", type=int, default=500)
    args = parser.parse_args()
    if args.scenes < 10:
        parser.error(f"--scenes must be >= 10, got {args.scenes}")
    torch.manual_seed(0)
    model, processor = build_default_model()
    tower = model.model.vision_tower
    grid = round(model.config.image_seq_length ** 0.5)
    rows = [json.loads(line) for line in (args.data / "scenes" / "train.jsonl").open()][: args.scenes]
    per_layer: list[list[torch.Tensor]] = []
    colors, shapes = [], []
    with torch.no_grad():
        for start in range(0, len(rows), 25):
            chunk = rows[start:start + 25]
            pixels = processor.image_processor([Image.open(args.data / r["image"]).convert("RGB") for r in chunk],
                                               return_tensors="pt")["pixel_values"]
            hidden = tower(pixels, output_hidden_states=True).hidden_states  # layers+1 x (B, 1 + grid^2, D)
            per_layer = per_layer or [[] for _ in hidden]
            for b, row in enumerate(chunk):
                for obj in row["scene"]["objects"]:
                    patch = 1 + min(int(obj["y"] * grid), grid - 1) * grid + min(int(obj["x"] * grid), grid - 1)
                    for layer, states in enumerate(hidden):
                        per_layer[layer].append(states[b, patch])
                    colors.append(list(COLORS).index(obj["color"]))
                    shapes.append(SHAPES.index(obj["shape"]))
    color_labels, shape_labels = torch.tensor(colors), torch.tensor(shapes)
    selected = len(per_layer) + VISION_FEATURE_LAYER if VISION_FEATURE_LAYER < 0 else VISION_FEATURE_LAYER
    print(f"{len(colors)} objects of {len(rows)} scenes, 80/20 split; chance: colour 12.5%, shape 16.7%")
    print("layer  colour  shape")
    for layer, features in enumerate(per_layer):
        x = torch.stack(features)
        mark = "  <- default model" if layer == selected else ""
        print(f"{layer:5d}  {100 * probe_accuracy(x, color_labels, len(COLORS)):5.1f}%  "
              f"{100 * probe_accuracy(x, shape_labels, len(SHAPES)):5.1f}%{mark}")


if __name__ == "__main__":
    main()
