"""What the analyses share: their inputs (an image and a prompt each), the model they run on, one prefill of one
sample, the image under a patch grid, and writing figures (matplotlib's Agg canvas, no pyplot state) and JSON.

Nothing here is an analysis itself (no ``@register_analysis``).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from divico.api import get_runtime, remove_compression, unwrap_model
from divico.checkpoint import load_compressor, read_saved_config
from divico.cli_options import add_model_arguments, resolve_device, resolve_dtype
from divico.evaluation.generation import build_chat_text
from divico.grids import VisualGrid
from divico.lora import has_lora, merge_lora
from divico.models import load_model_and_processor
from divico.registry import get_adapter
from divico.training.data import DataError, iter_json_records

__all__ = [
    "CELL_PIXELS",
    "AnalysisSample",
    "add_common_arguments",
    "add_input_arguments",
    "image_grid_of",
    "image_on_grid",
    "load_model_from_args",
    "load_samples",
    "load_samples_from_args",
    "merge_trained_weights",
    "model_inputs",
    "new_figure",
    "prefill",
    "progress",
    "require_uncompressed",
    "save_figure",
    "write_json",
]

#: Pixels per patch-grid cell in the drawn images (a 12 x 12 grid is drawn at 192 x 192 px).
CELL_PIXELS = 16


@dataclass(frozen=True)
class AnalysisSample:
    """One input of an analysis: an RGB image and the prompt asked about it.

    Attributes
    ----------
    sample_id
        Name in figures and JSON (the record's ``id``, else the image file's stem).
    image
        The RGB image as loaded (the processor resizes it).
    prompt
        The user text shown after the image.
    """

    sample_id: str
    image: Image.Image
    prompt: str


# --- command-line options ----------------------------------------------------------------------------------------
def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--dtype``, ``--device``, ``--merge``, ``--out``, ``--no-progress`` (every ``divico analyze``)."""
    add_model_arguments(parser)
    parser.add_argument("--merge", type=Path, default=None, metavar="DIR",
                        help="a divico training output (config.json + weights) folded into the model first: its "
                        "projector / LoRA weights are loaded and merged, its compression is not applied. The trained "
                        "default model is --model default --merge testbed/src/divico_testbed/assets/default/stage2")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (PNG + JSON)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def add_input_arguments(parser: argparse.ArgumentParser, *, default_limit: int) -> None:
    """``--data FILE [--image-folder DIR]`` or ``--image IMG ... --prompt TEXT``, and ``--limit N``."""
    parser.add_argument("--data", type=Path, default=None, metavar="FILE",
                        help="JSON list or JSONL of records with one 'image' (a path) and a 'question', or LLaVA "
                        "'conversations' (the first human turn is the prompt)")
    parser.add_argument("--image-folder", type=Path, default=None, metavar="DIR",
                        help="folder the records' image paths are relative to (default: the data file's folder)")
    parser.add_argument("--image", nargs="+", type=Path, default=[], metavar="IMG",
                        help="image files, each asked --prompt (instead of --data)")
    parser.add_argument("--prompt", default=None, help="the prompt asked about every --image")
    parser.add_argument("--limit", type=int, default=default_limit, metavar="N",
                        help=f"use the first N samples (default {default_limit})")


def load_samples_from_args(args: argparse.Namespace) -> list[AnalysisSample]:
    """The samples the input options name (:func:`add_input_arguments`).

    Raises
    ------
    ValueError
        Neither or both of ``--data`` / ``--image`` given, ``--image`` without ``--prompt``, or ``--limit`` < 1.
    """
    if (args.data is None) == (not args.image):
        raise ValueError("Give --data FILE or --image IMG [IMG ...] with --prompt TEXT (one of them).")
    if args.image:
        if not args.prompt:
            raise ValueError("--image needs --prompt TEXT (the prompt asked about every image).")
        return load_samples(images=args.image, prompt=args.prompt, limit=args.limit)
    return load_samples(data=args.data, image_folder=args.image_folder, limit=args.limit)


def load_model_from_args(args: argparse.Namespace) -> tuple[nn.Module, Any]:
    """``(model, processor)`` of ``--model`` in ``--dtype`` on ``--device``, eval mode, with ``--merge`` folded in.

    Raises
    ------
    FileNotFoundError
        ``--merge`` is not a divico training output.
    """
    if args.merge is not None:
        read_saved_config(args.merge)  # a clear error before the model loads
    model, processor = load_model_and_processor(args.model, resolve_dtype(args.dtype))
    if args.merge is not None:
        merge_trained_weights(model, args.merge)
    model.to(resolve_device(args.device))
    return model.eval(), processor


def merge_trained_weights(model: nn.Module, directory: str | Path) -> nn.Module:
    """Fold a training output's weights into ``model`` (in place): trained modules (e.g. a projector) stay, LoRA is
    merged into the base layers, and the compression it was trained with is removed again.

    Raises
    ------
    FileNotFoundError, ValueError
        As :func:`divico.load_compressor`.
    """
    load_compressor(model, directory)
    remove_compression(model)
    merge_lora(model)
    return model


def progress(items: Iterable[Any], *, description: str, enabled: bool, total: int | None = None) -> Iterable[Any]:
    """``items`` under a tqdm bar (to stderr) when ``enabled``."""
    return tqdm(items, desc=description, total=total, disable=not enabled, leave=False)


# --- samples -----------------------------------------------------------------------------------------------------
def _record_prompt(record: dict[str, Any]) -> str | None:
    if isinstance(record.get("question"), str):
        return record["question"]
    for turn in record.get("conversations") or []:
        if isinstance(turn, dict) and turn.get("from") == "human" and isinstance(turn.get("value"), str):
            return " ".join(turn["value"].replace("<image>", " ").split())
    return None


def load_samples(
    *,
    data: str | Path | None = None,
    image_folder: str | Path | None = None,
    images: Sequence[str | Path] = (),
    prompt: str | None = None,
    limit: int | None = None,
) -> list[AnalysisSample]:
    """Samples from a data file (records with one ``image`` and a ``question`` or LLaVA ``conversations``), or the
    same ``prompt`` about each of ``images``.

    Parameters
    ----------
    data
        JSON list or JSONL file.
    image_folder
        Folder the records' image paths are relative to (default: the data file's folder).
    images, prompt
        Image files and the prompt asked about each (instead of ``data``).
    limit
        Keep the first ``limit`` samples, >= 1 (None: all).

    Raises
    ------
    ValueError
        ``limit`` < 1, a record without one image path or without a prompt, or no sample at all.
    FileNotFoundError
        A missing data or image file.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be an integer >= 1, got {limit!r}.")
    pairs: list[tuple[str, Path, str]] = []
    if data is not None:
        folder = Path(image_folder) if image_folder is not None else Path(data).parent
        for entry in iter_json_records(data):
            if isinstance(entry, DataError):
                raise entry
            line, record = entry
            if not isinstance(record, dict) or not isinstance(record.get("image"), str):
                raise ValueError(f"{data}:{line}: a record needs one 'image' path (a string).")
            text = _record_prompt(record)
            if not text:
                raise ValueError(f"{data}:{line}: a record needs a 'question' or a human turn in 'conversations'.")
            path = folder / record["image"]
            pairs.append((str(record.get("id", path.stem)), path, text))
            if limit is not None and len(pairs) == limit:
                break
    else:
        if not prompt:
            raise ValueError("images need a prompt.")
        pairs = [(Path(path).stem, Path(path), prompt) for path in images][:limit]
    if not pairs:
        raise ValueError("No sample to analyse: the data file or the image list is empty.")
    samples = []
    for sample_id, path, text in pairs:
        if not path.is_file():
            raise FileNotFoundError(f"No image file at {path}.")
        with Image.open(path) as image:
            samples.append(AnalysisSample(sample_id, image.convert("RGB"), text))
    return samples


def model_inputs(model: nn.Module, processor: Any, sample: AnalysisSample) -> dict[str, torch.Tensor]:
    """The processor's inputs of one sample (batch 1, chat template as ``divico eval`` builds it), on the model's
    device, floating tensors in its dtype."""
    text = build_chat_text(processor, sample.prompt, 1, False)
    inputs = processor(images=[sample.image], text=[text], return_tensors="pt")
    parameter = next(model.parameters())
    out: dict[str, torch.Tensor] = {}
    for key, value in inputs.items():
        if torch.is_tensor(value):
            value = value.to(parameter.device)
            out[key] = value.to(parameter.dtype) if value.is_floating_point() else value
    return out


@torch.no_grad()
def prefill(model: nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
    """One forward over the prompt without a cache, the LM head on the last position only (the analyses read hooks
    and :func:`divico.last_report`, not the logits)."""
    return model(**inputs, use_cache=False, logits_to_keep=1)


# --- the image under its patch grid ------------------------------------------------------------------------------
def image_grid_of(model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, VisualGrid]:
    """Prompt positions of the image's grid cells and its grid, for a batch-1 prompt with one image.

    Returns
    -------
    tuple[torch.Tensor, VisualGrid]
        (h * w,) long prompt positions of the cells in row-major order (prefix tokens such as CLS left out), and
        the grid.

    Raises
    ------
    ValueError
        Not batch 1, not exactly one visual item, or a video (t > 1).
    """
    adapter = get_adapter(unwrap_model(model))
    input_ids = inputs["input_ids"]
    if input_ids.shape[0] != 1:
        raise ValueError(f"Analyses draw one prompt at a time; got a batch of {input_ids.shape[0]}.")
    visual = adapter.visual_token_mask(input_ids, None)
    items = [(mask, grid) for mask, grids in adapter.visual_grids(input_ids, visual, inputs) for grid in grids]
    if len(items) != 1 or items[0][1].t != 1:
        raise ValueError(f"Analyses draw prompts with exactly one image; this one has {len(items)} visual items "
                         f"({[grid for _, grid in items]}).")
    mask, grid = items[0]
    positions = mask[0].nonzero()[:, 0]
    return positions[grid.prefix:grid.prefix + grid.h * grid.w], grid


def image_on_grid(image: Image.Image, grid: VisualGrid, cell_pixels: int = CELL_PIXELS) -> np.ndarray:
    """The image resized (bicubic, no crop) so each grid cell is ``cell_pixels`` square: (h*c, w*c, 3) uint8."""
    resized = image.convert("RGB").resize((grid.w * cell_pixels, grid.h * cell_pixels), Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.uint8).copy()


# --- model configurations ----------------------------------------------------------------------------------------
def require_uncompressed(model: nn.Module, what: str) -> None:
    """Raise a ValueError naming ``what`` if ``model`` carries a compression or LoRA layers."""
    if get_runtime(model) is not None or has_lora(model):
        raise ValueError(f"{what} needs the stock model: remove its compression (divico.remove_compression) and "
                         "LoRA first.")


# --- output ------------------------------------------------------------------------------------------------------
def new_figure(rows: int, columns: int, *, cell_inches: float = 2.2) -> tuple[Figure, np.ndarray]:
    """A matplotlib Figure (no pyplot) with a (rows, columns) array of axes."""
    figure = Figure(figsize=(cell_inches * columns, cell_inches * rows + 0.4), constrained_layout=True)
    axes = figure.subplots(rows, columns, squeeze=False)
    return figure, axes


def save_figure(figure: Figure, path: Path, dpi: int = 110) -> Path:
    """Write ``figure`` as PNG (Agg) to ``path`` (parent folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as indented JSON (tensors / arrays as lists, NaN as null; parent folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(data), indent=2) + "\n")
    return path
