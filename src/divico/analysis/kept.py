"""Fig. 6: which visual tokens survive compression, drawn over the image.

For each configuration (by default FastV, DiViCo and DeCo at one rate; trained compressors through
``METHOD:KEEP:DIR`` specs as in ``divico eval --compare``) one prefill per image is run and
:func:`divico.last_report` read: layer-level methods (FastV, DiViCo) show the image with the kept patches as they
are and the rest dimmed; input-level methods (DeCo) show the pooled cells, each drawn in the mean colour of its
window. A trained DiViCo compressor carries LoRA on the attention layers, so layer K-1's scores, and with them the
selection, can differ from FastV's; the JSON gives the overlap.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from divico.analysis.base import Analysis, register_analysis
from divico.analysis.common import (
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
    save_figure,
    write_json,
)
from divico.api import last_report
from divico.config import CompressionConfig
from divico.evaluation.runner import EvalConfiguration, configured
from divico.grids import VisualGrid
from divico.registry import get_method_class
from divico.training.trainer import PAPER_KEEP_RATIO

#: Brightness factor of the removed patches in the drawings.
DIM_FACTOR = 0.25
#: Methods drawn by default, in order.
DEFAULT_METHODS = ("fastv", "divico", "deco")


@dataclass
class KeptPatches:
    """The visual tokens one configuration kept of one image.

    Attributes
    ----------
    label
        The configuration's name.
    method
        Registered method name.
    grid
        The image's patch grid.
    kept
        (h, w) bool: patches kept (layer-level methods), or None for input-level methods.
    scores
        (h, w) float32 selection scores (layer-level methods that score), or None.
    pooled
        (h', w') of the pooled grid (input-level methods), or None.
    num_kept, num_visual
        Visual tokens after and before compression (the report's counts; a CLS-like prefix included).
    """

    label: str
    method: str
    grid: VisualGrid
    kept: np.ndarray | None
    scores: np.ndarray | None
    pooled: tuple[int, int] | None
    num_kept: int
    num_visual: int


@torch.no_grad()
def kept_patches(model: nn.Module, inputs: dict[str, torch.Tensor], label: str = "") -> KeptPatches:
    """Run one prefill of a compressed model and read which patches of the (single) image it kept.

    Raises
    ------
    ValueError
        An uncompressed model, or a prompt without exactly one image (see :func:`image_grid_of`).
    """
    positions, grid = image_grid_of(model, inputs)
    prefill(model, inputs)
    report = last_report(model)
    num_kept, num_visual = int(report.num_kept[0]), int(report.num_visual[0])
    if get_method_class(report.method).level == "input":
        pooled_grids = report.extra.get("pooled_grids") or [[]]
        pooled = [g for grids in pooled_grids for g in grids][0]
        return KeptPatches(label or report.method, report.method, grid, None, None, (pooled.h, pooled.w),
                           num_kept, num_visual)
    kept_positions = report.kept_positions[0]
    kept = torch.isin(positions, kept_positions[kept_positions >= 0]).reshape(grid.h, grid.w)
    visual_positions = report.visual_positions[0]
    cell_scores = report.scores[0][torch.searchsorted(visual_positions[visual_positions >= 0], positions)]
    scores = None if bool(cell_scores.isnan().all()) else cell_scores.reshape(grid.h, grid.w).cpu().numpy()
    return KeptPatches(label or report.method, report.method, grid, kept.cpu().numpy(), scores, None, num_kept,
                       num_visual)


def kept_overlay(image: np.ndarray, kept: np.ndarray, dim: float = DIM_FACTOR) -> np.ndarray:
    """The image with the patches not kept dimmed (multiplied by ``dim``), the kept ones untouched.

    Parameters
    ----------
    image
        (H, W, 3) uint8, H and W multiples of the grid's h and w (:func:`divico.analysis.common.image_on_grid`).
    kept
        (h, w) bool.
    dim
        Brightness of removed patches, in [0, 1).

    Returns
    -------
    np.ndarray
        (H, W, 3) uint8.

    Raises
    ------
    ValueError
        ``dim`` outside [0, 1), or an image whose size is not a multiple of the grid.
    """
    if not 0.0 <= dim < 1.0:
        raise ValueError(f"dim must be in [0, 1), got {dim!r}.")
    height, width = image.shape[:2]
    rows, columns = kept.shape
    if height % rows or width % columns:
        raise ValueError(f"An image of {height}x{width} px does not divide into the {rows}x{columns} patch grid.")
    cell_mask = np.repeat(np.repeat(kept, height // rows, axis=0), width // columns, axis=1)
    dimmed = (image.astype(np.float32) * dim).round().astype(np.uint8)
    return np.where(cell_mask[..., None], image, dimmed)


def pooled_mosaic(image: np.ndarray, pooled: tuple[int, int]) -> np.ndarray:
    """The image as DeCo's pooled tokens see it: each of the h' x w' adaptive-pooling windows in its mean colour.

    Parameters
    ----------
    image
        (H, W, 3) uint8.
    pooled
        (h', w').

    Returns
    -------
    np.ndarray
        (H, W, 3) uint8.
    """
    height, width = image.shape[:2]
    pixels = torch.from_numpy(image).permute(2, 0, 1).float()[None]
    means = F.adaptive_avg_pool2d(pixels, pooled)[0]  # (3, h', w')
    rows = (np.arange(height) * pooled[0]) // height
    columns = (np.arange(width) * pooled[1]) // width
    return means.permute(1, 2, 0).round().byte().numpy()[rows][:, columns]


def default_configurations(keep_ratio: float, layer: int) -> list[EvalConfiguration]:
    """FastV, DiViCo and DeCo at ``keep_ratio`` (untrained: DiViCo selects as FastV does then)."""
    return [EvalConfiguration(f"{method}@{keep_ratio:.3g}", compression=CompressionConfig(
        method=method, keep_ratio=keep_ratio, layer=layer)) for method in DEFAULT_METHODS]


def kept_analysis(
    model: nn.Module,
    processor: Any,
    samples: Sequence[AnalysisSample],
    configurations: Sequence[EvalConfiguration],
    show_progress: bool = True,
) -> dict[str, list[KeptPatches]]:
    """sample id -> one :class:`KeptPatches` per configuration (in order)."""
    names = [c.name for c in configurations]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"Configuration names must be unique and at least one given, got {names}.")
    result: dict[str, list[KeptPatches]] = {sample.sample_id: [] for sample in samples}
    for configuration in progress(configurations, description="kept", enabled=show_progress):
        with configured(model, configuration):
            for sample in samples:
                result[sample.sample_id].append(
                    kept_patches(model, model_inputs(model, processor, sample), configuration.name))
    return result


def draw_kept(result: dict[str, list[KeptPatches]], samples: Sequence[AnalysisSample], path: Path) -> Path:
    """Fig. 6: a row per image: the image, then each configuration's kept patches (or pooled cells)."""
    by_id = {sample.sample_id: sample for sample in samples}
    keys = list(result)
    columns = 1 + max(len(entries) for entries in result.values())
    figure, axes = new_figure(len(keys), columns)
    for row, key in enumerate(keys):
        entries = result[key]
        image = image_on_grid(by_id[key].image, entries[0].grid)
        axes[row, 0].imshow(image)
        axes[row, 0].set_title(key, fontsize=8)
        for column, entry in enumerate(entries, start=1):
            if entry.kept is not None:
                drawn = kept_overlay(image, entry.kept)
                note = f"{int(entry.kept.sum())}/{entry.grid.h * entry.grid.w} patches"
            else:
                assert entry.pooled is not None
                drawn = pooled_mosaic(image, entry.pooled)
                note = f"{entry.pooled[0]}x{entry.pooled[1]} pooled"
            axes[row, column].imshow(drawn)
            axes[row, column].set_title(f"{entry.label}\n{note}", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    figure.suptitle("Visual tokens kept (others dimmed); DeCo: its pooled cells", fontsize=9)
    return save_figure(figure, path)


def _overlap(first: np.ndarray, second: np.ndarray) -> dict[str, float]:
    shared = int((first & second).sum())
    union = int((first | second).sum())
    return {"shared": shared, "jaccard": shared / union if union else 1.0}


def summarize(result: dict[str, list[KeptPatches]]) -> dict[str, Any]:
    """JSON of the kept cells (row-major indices), counts and the overlap of every pair of layer-level selections."""
    per_sample: dict[str, Any] = {}
    pair_overlaps: dict[str, list[float]] = {}
    for key, entries in result.items():
        rows = []
        for entry in entries:
            rows.append({
                "configuration": entry.label, "method": entry.method, "grid": [entry.grid.h, entry.grid.w],
                "num_kept": entry.num_kept, "num_visual": entry.num_visual,
                "kept_cells": None if entry.kept is None else np.flatnonzero(entry.kept).tolist(),
                "pooled_grid": None if entry.pooled is None else list(entry.pooled),
            })
        overlaps = {}
        selections = [e for e in entries if e.kept is not None]
        for i, first in enumerate(selections):
            for second in selections[i + 1:]:
                name = f"{first.label} vs {second.label}"
                overlaps[name] = _overlap(first.kept, second.kept)
                pair_overlaps.setdefault(name, []).append(overlaps[name]["jaccard"])
        per_sample[key] = {"configurations": rows, "overlap": overlaps}
    mean_jaccard = {name: float(np.mean(values)) for name, values in pair_overlaps.items()}
    return {"per_sample": per_sample, "mean_jaccard": mean_jaccard}


@register_analysis("kept")
class KeptAnalysis(Analysis):
    help = "Fig. 6: the kept visual tokens over the image, FastV vs DiViCo (and DeCo's pooled cells), at one rate"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        add_input_arguments(parser, default_limit=4)
        parser.add_argument("--keep-ratio", type=float, default=PAPER_KEEP_RATIO,
                            help="share of visual tokens kept by the default configurations (default 0.111)")
        parser.add_argument("--layer", type=int, default=2, help="K of the default configurations (default 2)")
        parser.add_argument("--configs", nargs="+", default=None, metavar="CONFIG",
                            help="configurations to draw instead of FastV, DiViCo and DeCo at --keep-ratio, as "
                            "divico eval --compare takes them: METHOD:KEEP[:DIR], a compressor DIR, LABEL=SPEC")

    def run(self, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
        configurations = (default_configurations(args.keep_ratio, args.layer) if args.configs is None else
                          [EvalConfiguration.parse(spec, default_layer=args.layer) for spec in args.configs])
        samples = load_samples_from_args(args)
        model, processor = load_model_from_args(args)
        result = kept_analysis(model, processor, samples, configurations, show_progress=not args.no_progress)
        figure = draw_kept(result, samples, out_dir / "kept_tokens.png")
        summary = {"analysis": "kept", "model": args.model, "merge": args.merge,
                   "configurations": [c.name for c in configurations], **summarize(result),
                   "figures": {"kept": str(figure)}}
        summary["headline"] = {"mean_jaccard": summary["mean_jaccard"]}
        write_json(out_dir / "kept.json", summary)
        return summary
