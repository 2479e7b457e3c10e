"""Fig. 1: where the last prompt token looks among the visual tokens, layer by layer — the evidence for K.

For layer l, the attention of the last prompt token to every token, mean over heads, is computed as the engine
scores tokens for compression (:class:`divico.scoring.LastTokenAttentionScorer` on layer l's own q/k projections
and RoPE tables; equal to eager ``output_attentions``), then read at the image's patch grid. Compressing at layer K
ranks the visual tokens by layer K-1's map.

Over a set of prompts, per layer, three numbers say how concentrated that attention is on the visual tokens:

* ``normalized_entropy``: entropy of the attention renormalised over the visual tokens, divided by log(Nv)
  (1 = uniform, 0 = one token);
* ``top_share``: the share of the visual attention held by the top ``top_ratio`` of the visual tokens (the keep
  count the compression would use; uniform attention gives ``k / Nv``, about ``top_ratio``);
* ``visual_mass``: the share of the last token's whole attention that falls on visual tokens.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.ticker import MaxNLocator
from torch import nn

from divico.analysis.base import Analysis, register_analysis
from divico.analysis.common import (
    CELL_PIXELS,
    AnalysisSample,
    add_input_arguments,
    image_grid_of,
    image_on_grid,
    load_model_from_args,
    load_samples_from_args,
    model_inputs,
    new_figure,
    prefill,
    progress,
    require_uncompressed,
    save_figure,
    write_json,
)
from divico.api import unwrap_model
from divico.config import keep_count
from divico.grids import VisualGrid
from divico.registry import get_adapter
from divico.scoring import LastTokenAttentionScorer
from divico.training.trainer import PAPER_KEEP_RATIO

#: Fractions of the depth whose layers Fig. 1 shows besides layers 0 and 2 (the paper's 15 and 25 of 32 layers).
DEFAULT_DEPTH_FRACTIONS = (1 / 2, 4 / 5)


def default_layers(num_layers: int) -> list[int]:
    """Layers 0 and 2 and the layers at 1/2 and 4/5 of the depth: 0-based ``ceil(f * L) - 1``, the paper's
    {0, 2, 15, 25} for L = 32 ({0, 2, 14, 23} for the default model's 30).

    Raises
    ------
    ValueError
        If ``num_layers`` < 1.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}.")
    layers = {0, min(2, num_layers - 1)}
    layers.update(max(0, math.ceil(fraction * num_layers) - 1) for fraction in DEFAULT_DEPTH_FRACTIONS)
    return sorted(layers)


@torch.no_grad()
def last_token_attention(model: nn.Module, inputs: dict[str, torch.Tensor], layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Attention of the last prompt token to every token at each of ``layers``, mean over heads.

    One forward of the uncompressed model; each layer's q/k projections are captured by the engine's scorer and one
    (B, H, 1, N) product per layer is taken (no eager attention needed).

    Parameters
    ----------
    model
        A stock (uncompressed) supported LVLM.
    inputs
        Its processor's inputs (left padding if batched).
    layers
        Decoder layer indices, each in [0, L-1].

    Returns
    -------
    dict[int, torch.Tensor]
        layer -> (B, N) float32 attention weights (each row sums to 1 over its real tokens; padding 0).

    Raises
    ------
    ValueError
        A layer outside [0, L-1], or a compressed model.
    """
    require_uncompressed(model, "The attention analysis")
    adapter = get_adapter(unwrap_model(model))
    num_layers = adapter.num_layers()
    bad = [layer for layer in layers if isinstance(layer, bool) or not isinstance(layer, int)
           or not 0 <= layer < num_layers]
    if bad or not layers:
        raise ValueError(f"layers must be a non-empty list of integers in [0, {num_layers - 1}], got {list(layers)}.")
    scorers = {layer: LastTokenAttentionScorer(adapter, adapter.attention(layer), mode="sdpa",
                                               sliding_window=adapter.sliding_window(layer))
               for layer in sorted(set(layers))}
    try:
        for scorer in scorers.values():
            scorer.register()
            scorer.enable()
        prefill(model, inputs)
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(inputs["input_ids"])
        return {layer: scorer.scores(None, mask) for layer, scorer in scorers.items()}
    finally:
        for scorer in scorers.values():
            scorer.enabled = False
            scorer.remove()


def concentration(visual_attention: torch.Tensor, top_ratio: float, total_attention: float = 1.0) -> dict[str, float]:
    """How concentrated one attention row is over the visual tokens.

    Parameters
    ----------
    visual_attention
        (Nv,) attention weights on the visual tokens, Nv >= 2.
    top_ratio
        Share of the visual tokens counted as "top", in (0, 1] (keep count: ``max(1, round(top_ratio * Nv))``).
    total_attention
        The row's total attention (1 for a softmax row), for ``visual_mass``.

    Returns
    -------
    dict
        ``normalized_entropy``, ``top_share``, ``uniform_top_share`` (``k / Nv``), ``visual_mass``.

    Raises
    ------
    ValueError
        Fewer than 2 visual tokens, no attention on them, or ``top_ratio`` outside (0, 1].
    """
    weights = visual_attention.double()
    count = weights.numel()
    if count < 2:
        raise ValueError(f"concentration needs at least 2 visual tokens, got {count}.")
    mass = float(weights.sum())
    if not mass > 0:
        raise ValueError("The attention on the visual tokens sums to 0; its concentration is undefined.")
    top = keep_count(count, keep_ratio=top_ratio)
    p = weights / mass
    entropy = float(-(p * torch.log(p.clamp_min(1e-300))).sum())
    return {
        "normalized_entropy": entropy / math.log(count),
        "top_share": float(p.topk(top).values.sum()),
        "uniform_top_share": top / count,
        "visual_mass": mass / total_attention,
    }


@dataclass
class AttentionMaps:
    """Result of :func:`attention_analysis`.

    Attributes
    ----------
    layers
        Layers drawn as maps.
    maps
        sample id -> layer -> (h, w) float32 attention of the last prompt token to each patch (not renormalised).
    curve
        Per layer (all layers): mean and standard deviation over the prompts of each :func:`concentration` number.
    per_prompt
        sample id -> layer -> :func:`concentration` numbers.
    """

    layers: list[int]
    maps: dict[str, dict[int, np.ndarray]]
    curve: dict[str, dict[str, list[float]]]
    per_prompt: dict[str, dict[int, dict[str, float]]]
    num_layers: int
    top_ratio: float


def attention_analysis(
    model: nn.Module,
    processor: Any,
    samples: Sequence[AnalysisSample],
    layers: Sequence[int] | None = None,
    num_maps: int = 4,
    top_ratio: float = PAPER_KEEP_RATIO,
    show_progress: bool = True,
) -> AttentionMaps:
    """Maps at ``layers`` for the first ``num_maps`` samples and the concentration curve over all samples.

    Raises
    ------
    ValueError
        As :func:`last_token_attention` and :func:`concentration`; ``num_maps`` < 0.
    """
    if num_maps < 0:
        raise ValueError(f"num_maps must be >= 0, got {num_maps}.")
    num_layers = get_adapter(unwrap_model(model)).num_layers()
    map_layers = default_layers(num_layers) if layers is None else sorted(set(layers))
    maps: dict[str, dict[int, np.ndarray]] = {}
    per_prompt: dict[str, dict[int, dict[str, float]]] = {}
    all_layers = list(range(num_layers))
    for index, sample in enumerate(progress(samples, description="attention", enabled=show_progress)):
        inputs = model_inputs(model, processor, sample)
        positions, grid = image_grid_of(model, inputs)
        rows = last_token_attention(model, inputs, sorted(set(all_layers) | set(map_layers)))
        key = sample.sample_id if sample.sample_id not in per_prompt else f"{sample.sample_id}#{index}"
        per_prompt[key] = {layer: concentration(rows[layer][0, positions], top_ratio) for layer in all_layers}
        if index < num_maps:
            maps[key] = {layer: rows[layer][0, positions].reshape(grid.h, grid.w).cpu().numpy() for layer in map_layers}
    names = ("normalized_entropy", "top_share", "uniform_top_share", "visual_mass")
    curve: dict[str, dict[str, list[float]]] = {}
    for name in names:
        values = np.array([[per_prompt[key][layer][name] for layer in all_layers] for key in per_prompt])
        curve[name] = {"mean": values.mean(axis=0).tolist(), "std": values.std(axis=0).tolist()}
    return AttentionMaps(map_layers, maps, curve, per_prompt, num_layers, top_ratio)


def draw_maps(result: AttentionMaps, samples: Sequence[AnalysisSample], path: Path) -> Path:
    """Fig. 1: per sample a row: the image, then its attention map at each layer over the image (own colour scale)."""
    keys = list(result.maps)
    by_id = {sample.sample_id: sample for sample in samples}
    figure, axes = new_figure(max(1, len(keys)), 1 + len(result.layers))
    for row, key in enumerate(keys):
        sample = by_id.get(key.split("#")[0], samples[row])
        h, w = result.maps[key][result.layers[0]].shape
        image = image_on_grid(sample.image, VisualGrid(1, h, w))
        axes[row, 0].imshow(image)
        axes[row, 0].set_title(key if row else f"{key}\n(image)", fontsize=8)
        for column, layer in enumerate(result.layers, start=1):
            ax = axes[row, column]
            ax.imshow(image, alpha=0.35)
            ax.imshow(result.maps[key][layer], cmap="inferno", alpha=0.75, interpolation="nearest",
                      extent=(0, w * CELL_PIXELS, h * CELL_PIXELS, 0))
            if row == 0:
                ax.set_title(f"layer {layer}", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    figure.suptitle("Last prompt token's attention to the visual tokens (mean over heads; brighter = more)",
                    fontsize=9)
    return save_figure(figure, path)


def draw_curve(result: AttentionMaps, path: Path, compression_layer: int | None = None) -> Path:
    """Concentration per layer (mean +- std over the prompts): normalised entropy, top share, visual mass."""
    figure, axes = new_figure(1, 3, cell_inches=3.2)
    layers = np.arange(result.num_layers)
    titles = {"normalized_entropy": "entropy / log(Nv) (1 = uniform)",
              "top_share": f"share held by the top {100 * result.top_ratio:.1f}%",
              "visual_mass": "attention on visual tokens (of all)"}
    for ax, (name, title) in zip(axes[0], titles.items()):
        mean, std = np.array(result.curve[name]["mean"]), np.array(result.curve[name]["std"])
        ax.plot(layers, mean, marker="o", markersize=3)
        ax.fill_between(layers, mean - std, mean + std, alpha=0.25)
        if name == "top_share":
            ax.plot(layers, result.curve["uniform_top_share"]["mean"], linestyle=":", color="grey",
                    label="uniform attention")
            ax.legend(fontsize=7)
        if compression_layer is not None and compression_layer >= 1:
            ax.axvline(compression_layer - 1, color="red", linestyle="--", linewidth=1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("decoder layer", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
    figure.suptitle(f"Concentration of the last prompt token's attention over {len(result.per_prompt)} prompts"
                    + ("" if compression_layer is None else f" (red: layer K-1 = {compression_layer - 1}, scored "
                       f"for K = {compression_layer})"), fontsize=9)
    return save_figure(figure, path)


@register_analysis("attention")
class AttentionAnalysis(Analysis):
    help = "Fig. 1: the last prompt token's attention over the image per layer, and its concentration curve (K)"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        add_input_arguments(parser, default_limit=32)
        parser.add_argument("--layers", nargs="+", type=int, default=None, metavar="L",
                            help="layers drawn as maps (default: 0, 2 and the layers at 1/2 and 4/5 of the depth)")
        parser.add_argument("--maps", type=int, default=4, metavar="N",
                            help="samples drawn as maps (the first N; default 4); the curve uses all --limit")
        parser.add_argument("--top-ratio", type=float, default=PAPER_KEEP_RATIO,
                            help="share of the visual tokens counted as the top (default 64/576 = 0.111)")
        parser.add_argument("--layer", type=int, default=2,
                            help="K to mark on the curve (scored at layer K-1; default 2)")

    def run(self, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
        samples = load_samples_from_args(args)
        model, processor = load_model_from_args(args)
        result = attention_analysis(model, processor, samples, args.layers, args.maps, args.top_ratio,
                                    show_progress=not args.no_progress)
        figures = {"maps": str(draw_maps(result, samples, out_dir / "attention_maps.png")) if result.maps else None,
                   "curve": str(draw_curve(result, out_dir / "attention_concentration.png", args.layer))}
        summary = {"analysis": "attention", "model": args.model, "merge": args.merge, "num_layers": result.num_layers,
                   "map_layers": result.layers, "num_prompts": len(result.per_prompt), "top_ratio": result.top_ratio,
                   "curve": result.curve, "per_prompt": result.per_prompt, "maps": result.maps, "figures": figures}
        write_json(out_dir / "attention.json", summary)
        return summary
