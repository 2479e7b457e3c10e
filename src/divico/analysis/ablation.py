"""Fig. 8: the ablations of DiViCo (a: FastV selection + LoRA, no disentangled compression; b: a deterministic gap
encoder without the KL) as ratios of the full module's scores, and the sensitivity to K (the first compressed layer).

``ablation`` scores trained compressor folders (the default model's testbed trains ``variant_a-keep11.1``,
``variant_b-keep11.1`` and ``divico-keep11.1`` under a run's ``compressors/``) and reports each benchmark's score as
a ratio to the full DiViCo's (``ablation.png`` bars, ``ablation_table.md``, ``ablation.json``).

``ksweep`` scores DiViCo at one rate for each K of a list, training a compressor for every K whose checkpoint folder
(``CHECKPOINTS/divico-k<K>``) is missing with :func:`divico.training.train` (a short run: ``--train-steps``). The
default list is the paper's {2, 7, 19} of LLaVA-13B's 40 layers scaled to the model's depth L:
``K' = max(1, floor(K * L / 40 + 0.5))`` (round half up; at least 1, because layer 0 must see the full sequence),
repeats dropped; e.g. L = 30 gives {2, 5, 14}. Drawn as the paper's radar (each benchmark's score divided by the
best K's) or as bars of the raw scores (``ksweep.png``, ``ksweep_table.md``, ``ksweep.json``).

Scoring is :func:`divico.evaluation.runner.score_configurations` (the evaluation runner; resumable) on registered
benchmarks (``--data-root``) or mini-benchmark records (``--records``).
"""

from __future__ import annotations

import argparse
import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from torch import nn

from divico.analysis.base import Analysis, register_analysis
from divico.analysis.common import load_model_from_args, new_figure, save_figure, write_json
from divico.analysis.noise import (
    PAPER_KEEP_RATIO,
    add_benchmark_arguments,
    benchmarks_from_args,
    headline_scores,
    question_counts,
    runner_limit,
)
from divico.config import CompressionConfig
from divico.evaluation.benchmark import Benchmark
from divico.evaluation.runner import EvalConfiguration, score_configurations
from divico.registry import get_adapter
from divico.training import TrainingConfig, train

__all__ = [
    "PAPER_DEPTH",
    "PAPER_LAYERS",
    "KSweepTraining",
    "ablation_study",
    "format_ratio_table",
    "k_sweep",
    "plot_k_sweep",
    "plot_ratios",
    "scaled_layers",
    "score_ratios",
]

#: The paper's K values (Fig. 8 c) and the depth of the model they were chosen on (LLaVA-v1.5-13B: 40 layers).
PAPER_LAYERS = (2, 7, 19)
PAPER_DEPTH = 40
#: Fig. 8's names of the variants (the full module is the reference, ratio 1).
VARIANT_A = "w/o disentangled compression (a)"
VARIANT_B = "w/o disentangled encoding (b)"
FULL = "DiViCo"
PLOT_STYLES = ("radar", "bars")


# -- ratios to the full module ----------------------------------------------------------------------------------

def score_ratios(scores: Mapping[str, Mapping[str, float | None]], reference: str) -> dict[str, dict[str, float | None]]:
    """Each configuration's score divided by ``reference``'s, per benchmark (None where either is missing or the
    reference is 0).

    Parameters
    ----------
    scores
        ``configuration -> benchmark -> score``.
    reference
        The configuration every other one is divided by (its own ratios are 1).

    Raises
    ------
    ValueError
        If ``reference`` is not among ``scores``.
    """
    if reference not in scores:
        raise ValueError(f"Reference {reference!r} is not among the configurations {sorted(scores)}.")
    base = scores[reference]
    ratios: dict[str, dict[str, float | None]] = {}
    for name, per_benchmark in scores.items():
        ratios[name] = {}
        for benchmark, value in per_benchmark.items():
            denominator = base.get(benchmark)
            ratios[name][benchmark] = (None if value is None or denominator is None or denominator == 0
                                       else value / denominator)
    return ratios


def format_ratio_table(scores: Mapping[str, Mapping[str, float | None]],
                       ratios: Mapping[str, Mapping[str, float | None]], benchmarks: Sequence[str]) -> str:
    """Markdown: a row per configuration, each cell ``score (ratio)``."""
    lines = ["| Configuration | " + " | ".join(benchmarks) + " |", "|" + "---|" * (len(benchmarks) + 1)]
    for name, per_benchmark in scores.items():
        cells = []
        for benchmark in benchmarks:
            value, ratio = per_benchmark.get(benchmark), ratios[name].get(benchmark)
            cells.append("-" if value is None else f"{value:.2f}" + ("" if ratio is None else f" ({ratio:.3f})"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_ratios(ratios: Mapping[str, Mapping[str, float | None]], benchmarks: Sequence[str], path: Path,
                title: str) -> Path:
    """Fig. 8 (a, b): bars of each configuration's ratio to the full module, per benchmark."""
    names = list(ratios)
    figure, axes = new_figure(1, 1)
    figure.set_size_inches(1.8 + 1.4 * len(benchmarks), 3.6)
    axis = axes[0, 0]
    width = 0.8 / max(len(names), 1)
    positions = np.arange(len(benchmarks))
    colors = {VARIANT_A: "tab:red", VARIANT_B: "tab:blue", FULL: "0.6"}
    for index, name in enumerate(names):
        heights = [math.nan if ratios[name][b] is None else ratios[name][b] for b in benchmarks]
        axis.bar(positions + (index - (len(names) - 1) / 2) * width, heights, width, label=name,
                 color=colors.get(name))
    axis.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    axis.set_xticks(positions, list(benchmarks))
    axis.set_ylabel("score / full DiViCo's")
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=7)
    return save_figure(figure, path)


def ablation_study(
    model: nn.Module,
    processor: Any,
    benchmarks: Sequence[Benchmark],
    out_dir: str | Path,
    *,
    full: Path,
    variants: Mapping[str, Path],
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    show_progress: bool = True,
    run_info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Score the variants and the full DiViCo (trained compressor folders); write the ratios (table, JSON, bars).

    Parameters
    ----------
    model, processor
        The stock model the compressors were trained on, and its processor.
    benchmarks
        Benchmark instances.
    out_dir
        Output folder (``ablation.png``, ``ablation_table.md``, ``ablation.json``; the runner's folders in
        ``runs/``).
    full
        The full DiViCo's compressor folder (the reference, ratio 1).
    variants
        ``name -> compressor folder`` (e.g. :data:`VARIANT_A`, :data:`VARIANT_B`).
    limit, batch_size, max_new_tokens, show_progress, run_info
        As :func:`divico.evaluation.runner.evaluate_benchmark`.

    Returns
    -------
    dict
        ``benchmarks``, ``scores``, ``ratios`` (configuration -> benchmark -> ratio to :data:`FULL`), ``mean_ratio``,
        ``questions``, ``checkpoints``, ``figures``, ``headline``.
    """
    for name, folder in {**variants, FULL: full}.items():
        if not (Path(folder) / "config.json").is_file():
            raise FileNotFoundError(f"No trained compressor for {name!r} at {folder} (expected config.json there).")
    out = Path(out_dir)
    configurations = [EvalConfiguration(name, compressor=Path(folder)) for name, folder in variants.items()]
    configurations.append(EvalConfiguration(FULL, compressor=Path(full)))
    results = score_configurations(model, processor, configurations, benchmarks, out / "runs", limit=limit,
                                   batch_size=batch_size, max_new_tokens=max_new_tokens, show_progress=show_progress,
                                   run_info=dict(run_info or {}))
    scores = headline_scores(results)
    names = [b.name for b in benchmarks]
    ratios = score_ratios(scores, FULL)
    summary: dict[str, Any] = {
        "benchmarks": names,
        "scores": scores,
        "ratios": ratios,
        "mean_ratio": {name: _mean(list(ratios[name].values())) for name in ratios},
        "questions": question_counts(results),
        "checkpoints": {**{name: str(folder) for name, folder in variants.items()}, FULL: str(full)},
    }
    (out / "ablation_table.md").write_text(format_ratio_table(scores, ratios, names) + "\n", encoding="utf-8")
    summary["figures"] = {"ratios": str(plot_ratios(ratios, names, out / "ablation.png",
                                                    "Fig. 8 (a, b): scores as ratios to the full DiViCo"))}
    summary["headline"] = {f"mean ratio to {FULL}, {name}": value for name, value in summary["mean_ratio"].items()}
    write_json(out / "ablation.json", summary)
    return summary


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


# -- the K sweep ------------------------------------------------------------------------------------------------

def scaled_layers(num_layers: int, paper_layers: Sequence[int] = PAPER_LAYERS,
                  paper_depth: int = PAPER_DEPTH) -> list[int]:
    """The paper's K values scaled from ``paper_depth`` layers to ``num_layers``:
    ``max(1, floor(K * num_layers / paper_depth + 0.5))``, repeats dropped, in order.

    Raises
    ------
    ValueError
        ``num_layers`` < 2 (no layer to compress after layer 0), or a paper K outside [1, paper_depth).
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 2:
        raise ValueError(f"num_layers must be an integer >= 2, got {num_layers!r}.")
    layers: list[int] = []
    for k in paper_layers:
        if not 1 <= k < paper_depth:
            raise ValueError(f"Paper layer {k} is outside [1, {paper_depth - 1}].")
        scaled = max(1, math.floor(k * num_layers / paper_depth + 0.5))
        if scaled not in layers:
            layers.append(scaled)
    return layers


@dataclass(frozen=True)
class KSweepTraining:
    """How :func:`k_sweep` trains a DiViCo compressor for a K without a checkpoint (a short run).

    Attributes
    ----------
    data_path, image_folder
        LLaVA-format training data and the folder its images are relative to.
    max_steps
        Optimiser steps, >= 1.
    batch_size, learning_rate, lora_r, beta, seed
        As :class:`divico.training.TrainingConfig` (``per_device_batch_size``, ...).
    """

    data_path: Path
    image_folder: Path | None = None
    max_steps: int = 50
    batch_size: int = 4
    learning_rate: float = 2e-4
    lora_r: int = 8
    beta: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or self.max_steps < 1:
            raise ValueError(f"max_steps must be an integer >= 1, got {self.max_steps!r}.")

    def config(self, output_dir: Path, compression: CompressionConfig, show_progress: bool) -> TrainingConfig:
        return TrainingConfig(
            data_path=self.data_path, image_folder=self.image_folder, output_dir=output_dir, compression=compression,
            beta=self.beta, lora_r=self.lora_r, lora_alpha=2.0 * self.lora_r, lora_dropout=0.0,
            learning_rate=self.learning_rate, warmup=0, lr_scheduler="constant", max_steps=self.max_steps,
            per_device_batch_size=self.batch_size, logging_steps=max(1, self.max_steps // 5),
            save_steps=self.max_steps, save_total_limit=1, seed=self.seed, report_to="none",
            show_progress=show_progress,
        )


def checkpoint_folder(root: Path, layer: int) -> Path:
    """Where the K sweep keeps (or finds) the compressor of K = ``layer``."""
    return Path(root) / f"divico-k{layer}"


def k_sweep(
    model: nn.Module,
    processor: Any,
    benchmarks: Sequence[Benchmark],
    out_dir: str | Path,
    *,
    checkpoints: Path,
    layers: Sequence[int] | None = None,
    keep_ratio: float = PAPER_KEEP_RATIO,
    training: KSweepTraining | None = None,
    plot: str = "radar",
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    show_progress: bool = True,
    run_info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """DiViCo at ``keep_ratio`` for each K in ``layers``: train the missing checkpoints, score all, draw them.

    Parameters
    ----------
    model, processor
        The stock model and its processor (training runs on a copy; the model is left as it was).
    benchmarks
        Benchmark instances.
    out_dir
        Output folder (``ksweep.png``, ``ksweep_table.md``, ``ksweep.json``; the runner's folders in ``runs/``).
    checkpoints
        Folder of the compressors, one per K: :func:`checkpoint_folder` (``divico-k<K>``).
    layers
        The K values, each in [1, L - 1]; None: :func:`scaled_layers` of the model's depth.
    keep_ratio
        Share of visual tokens kept (default 1/9).
    training
        How to train a missing checkpoint; None: every checkpoint must exist.
    plot
        ``radar`` (each benchmark divided by its best K's score) or ``bars`` (raw scores).
    limit, batch_size, max_new_tokens, show_progress, run_info
        As :func:`divico.evaluation.runner.evaluate_benchmark`.

    Returns
    -------
    dict
        ``layers``, ``num_layers``, ``scaled_from`` (the paper's K and depth, or None for a given list), ``trained``
        (the K values trained in this call), ``scores`` (``"K=<k>"`` -> benchmark -> score), ``relative_to_best``,
        ``questions``, ``figures``, ``headline``.

    Raises
    ------
    ValueError
        A K outside [1, L - 1], repeated K values, or an unknown ``plot``.
    FileNotFoundError
        A missing checkpoint without ``training``.
    """
    if plot not in PLOT_STYLES:
        raise ValueError(f"Unknown plot {plot!r}; valid: {', '.join(PLOT_STYLES)}.")
    num_layers = get_adapter(model).num_layers()
    chosen = scaled_layers(num_layers) if layers is None else [int(k) for k in layers]
    bad = [k for k in chosen if not 1 <= k < num_layers]
    if bad or len(set(chosen)) != len(chosen):
        raise ValueError(f"K values must be distinct and in [1, {num_layers - 1}] for this {num_layers}-layer model, "
                         f"got {chosen}.")
    trained = []
    for k in chosen:
        folder = checkpoint_folder(checkpoints, k)
        if (folder / "config.json").is_file():
            continue
        if training is None:
            raise FileNotFoundError(f"No checkpoint for K={k} at {folder}; give training data to train it.")
        # train() adds LoRA and hooks in place: a copy keeps the stock model for scoring.
        student = copy.deepcopy(model)
        train(student, processor, training.config(folder, CompressionConfig("divico", keep_ratio=keep_ratio, layer=k),
                                                  show_progress))
        del student
        trained.append(k)
    configurations = [EvalConfiguration(f"K={k}", compressor=checkpoint_folder(checkpoints, k)) for k in chosen]
    out = Path(out_dir)
    results = score_configurations(model, processor, configurations, benchmarks, out / "runs", limit=limit,
                                   batch_size=batch_size, max_new_tokens=max_new_tokens, show_progress=show_progress,
                                   run_info=dict(run_info or {}))
    scores = headline_scores(results)
    names = [b.name for b in benchmarks]
    best = {b: max((s[b] for s in scores.values() if s[b] is not None), default=None) for b in names}
    relative = {name: {b: (None if s[b] is None or not best[b] else s[b] / best[b]) for b in names}
                for name, s in scores.items()}
    summary: dict[str, Any] = {
        "layers": chosen,
        "num_layers": num_layers,
        "scaled_from": ({"paper_layers": list(PAPER_LAYERS), "paper_depth": PAPER_DEPTH,
                         "rule": "max(1, floor(K * L / 40 + 0.5))"} if layers is None else None),
        "keep_ratio": keep_ratio,
        "trained": trained,
        "scores": scores,
        "relative_to_best": relative,
        "questions": question_counts(results),
    }
    (out / "ksweep_table.md").write_text(format_ratio_table(scores, relative, names) + "\n", encoding="utf-8")
    summary["figures"] = {"ksweep": str(plot_k_sweep(summary, names, out / "ksweep.png", plot))}
    summary["headline"] = {name: scores[name] for name in scores}
    write_json(out / "ksweep.json", summary)
    return summary


def plot_k_sweep(summary: Mapping[str, Any], benchmarks: Sequence[str], path: Path, plot: str) -> Path:
    """Fig. 8 (c): a radar of each K's score relative to the best K per benchmark, or bars of the raw scores."""
    names = list(summary["scores"])
    title = f"Fig. 8 (c): DiViCo at keep {summary['keep_ratio']:.3f} for K in {summary['layers']}"
    if plot == "bars":
        figure, axes = new_figure(1, 1)
        figure.set_size_inches(1.8 + 1.4 * len(benchmarks), 3.6)
        axis = axes[0, 0]
        width = 0.8 / max(len(names), 1)
        positions = np.arange(len(benchmarks))
        for index, name in enumerate(names):
            heights = [math.nan if summary["scores"][name][b] is None else summary["scores"][name][b]
                       for b in benchmarks]
            axis.bar(positions + (index - (len(names) - 1) / 2) * width, heights, width, label=name)
        axis.set_xticks(positions, list(benchmarks))
        axis.set_ylabel("score")
    else:
        figure = Figure(figsize=(4.6, 4.4), constrained_layout=True)
        axis = figure.add_subplot(projection="polar")
        angles = np.linspace(0.0, 2 * np.pi, len(benchmarks), endpoint=False)
        closed = np.concatenate([angles, angles[:1]])
        for name in names:
            values = [summary["relative_to_best"][name][b] for b in benchmarks]
            radii = np.array([0.0 if v is None else v for v in values])
            axis.plot(closed, np.concatenate([radii, radii[:1]]), label=name)
            axis.fill(closed, np.concatenate([radii, radii[:1]]), alpha=0.1)
        axis.set_xticks(angles, list(benchmarks))
        axis.set_ylim(0.0, 1.05)
        axis.set_title(title + "\n(score / best K's)", fontsize=8)
        axis.legend(fontsize=7, loc="lower right", bbox_to_anchor=(1.15, -0.1))
        return save_figure(figure, path)
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=7)
    return save_figure(figure, path)


# -- commands ---------------------------------------------------------------------------------------------------

@register_analysis("ablation")
class AblationAnalysis(Analysis):
    """``divico analyze ablation``: Fig. 8 (a, b)."""

    help = "Fig. 8 (a, b): variants a (FastV + LoRA) and b (deterministic encoder) as ratios to the full DiViCo"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        add_benchmark_arguments(parser)
        parser.add_argument("--compressors", type=Path, default=None, metavar="DIR",
                            help="folder with variant_a-TAG, variant_b-TAG and divico-TAG (the default model: "
                            "testbed/src/divico_testbed/assets/default/compressors)")
        parser.add_argument("--tag", default="keep11.1", help="rate tag of the folders (default keep11.1)")
        parser.add_argument("--full", type=Path, default=None, metavar="DIR", help="the full DiViCo's folder")
        parser.add_argument("--variant-a", type=Path, default=None, metavar="DIR", help="variant a's folder")
        parser.add_argument("--variant-b", type=Path, default=None, metavar="DIR", help="variant b's folder")

    def run(self, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
        def folder(given: Path | None, method: str) -> Path:
            if given is not None:
                return given
            if args.compressors is None:
                raise ValueError(f"Give --compressors DIR (with {method}-{args.tag}) or the folder itself.")
            return args.compressors / f"{method}-{args.tag}"

        variants = {VARIANT_A: folder(args.variant_a, "variant_a"), VARIANT_B: folder(args.variant_b, "variant_b")}
        full = folder(args.full, "divico")
        benchmarks = benchmarks_from_args(args)
        model, processor = load_model_from_args(args)
        return ablation_study(model, processor, benchmarks, out_dir, full=full, variants=variants,
                              limit=runner_limit(args), batch_size=args.batch_size,
                              max_new_tokens=args.max_new_tokens, show_progress=not args.no_progress,
                              run_info={"model_name": args.model,
                                        "merged": None if args.merge is None else str(args.merge)})


@register_analysis("ksweep")
class KSweepAnalysis(Analysis):
    """``divico analyze ksweep``: Fig. 8 (c)."""

    help = "Fig. 8 (c): DiViCo for K in a list (default the paper's {2, 7, 19} of 40 layers, scaled), training " \
           "missing checkpoints"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        add_benchmark_arguments(parser)
        parser.add_argument("--layers", type=int, nargs="+", default=None, metavar="K",
                            help="K values (default: 2, 7, 19 of 40 layers scaled to the model's depth, "
                            "max(1, floor(K * L / 40 + 0.5)))")
        parser.add_argument("--keep-ratio", type=float, default=PAPER_KEEP_RATIO,
                            help="share of visual tokens kept (default 1/9)")
        parser.add_argument("--checkpoints", type=Path, required=True, metavar="DIR",
                            help="folder of the compressors, DIR/divico-k<K> (missing ones are trained there)")
        parser.add_argument("--train-data", type=Path, default=None, metavar="FILE",
                            help="LLaVA-format training data for the missing checkpoints")
        parser.add_argument("--image-folder", type=Path, default=None, metavar="DIR",
                            help="folder the training images are relative to (default: the data file's folder)")
        parser.add_argument("--train-steps", type=int, default=50, help="steps per missing checkpoint (default 50)")
        parser.add_argument("--train-batch-size", type=int, default=4, help="training batch size (default 4)")
        parser.add_argument("--learning-rate", type=float, default=2e-4, help="learning rate (default 2e-4)")
        parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default 8)")
        parser.add_argument("--plot", default="radar", choices=PLOT_STYLES, help="radar (default) or bars")

    def run(self, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
        training = None if args.train_data is None else KSweepTraining(
            data_path=args.train_data, image_folder=args.image_folder, max_steps=args.train_steps,
            batch_size=args.train_batch_size, learning_rate=args.learning_rate, lora_r=args.lora_r)
        benchmarks = benchmarks_from_args(args)
        model, processor = load_model_from_args(args)
        return k_sweep(model, processor, benchmarks, out_dir, checkpoints=args.checkpoints, layers=args.layers,
                       keep_ratio=args.keep_ratio, training=training, plot=args.plot, limit=runner_limit(args),
                       batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                       show_progress=not args.no_progress,
                       run_info={"model_name": args.model,
                                 "merged": None if args.merge is None else str(args.merge)})
