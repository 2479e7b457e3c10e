"""Fig. 7 / Eq. 16: how disentangled DiViCo's gap encoding is — the independence level IL of its dimensions.

``IL = 1 - 2 / (d (d - 1)) * sum_{i<j} |corr_ij|`` (:func:`information_level`) over the d dimensions of vectors
collected from the DiViCo compressor over a set of prompts, in eval mode (g_theta's mean, what inference adds):

* ``gap``: v_c', the gap g_theta adds to each kept token (the vector the KL term pulls towards N(0, I));
* ``token``: v_c = v_s + v_c', the compressed token layer K receives;
* ``selected``: v_s, the kept token before the gap (what FastV passes on), as a reference.

Sources: trained compressor folders (``--compressor DIR ...``), or a training run (``--run DIR``): every
``DIR/checkpoints/checkpoint-N`` and the final weights, drawn as a curve over the steps, with the IL that
:class:`divico.training.callbacks.InformationLevelCallback` logged during training beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from divico.analysis.base import Analysis, register_analysis
from divico.analysis.common import (
    AnalysisSample,
    add_input_arguments,
    load_model_from_args,
    load_samples_from_args,
    model_inputs,
    new_figure,
    prefill,
    progress,
    save_figure,
    write_json,
)
from divico.api import get_runtime, unwrap_model
from divico.checkpoint import read_saved_config
from divico.evaluation.runner import EvalConfiguration, configured
from divico.training.callbacks import INFORMATION_LEVEL_KEY, InformationLevelCallback, information_level
from divico.training.trainer import CHECKPOINT_SUBDIR, TRAINABLE_WEIGHTS_NAME

__all__ = ["VECTOR_KINDS", "collect_gap_vectors", "independent_reference", "information_level", "leakage_analysis"]

#: The vectors whose IL is measured (see the module docstring).
VECTOR_KINDS = ("gap", "token", "selected")
_CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


@torch.no_grad()
def collect_gap_vectors(model: nn.Module, processor: Any, samples: Sequence[AnalysisSample]) -> dict[str, torch.Tensor]:
    """The ``gap``, ``token`` and ``selected`` vectors of every kept visual token over ``samples`` (one prefill each).

    Parameters
    ----------
    model
        A model compressed with DiViCo and a gap encoder (e.g. after :func:`divico.load_compressor`).

    Returns
    -------
    dict[str, torch.Tensor]
        kind -> (R, d) float32 on the CPU, R = kept tokens summed over the samples.

    Raises
    ------
    ValueError
        The model has no gap encoder.
    """
    runtime = get_runtime(model)
    encoder = None if runtime is None else runtime.compressor
    if not InformationLevelCallback.applies_to(encoder):
        raise ValueError("The leakage analysis needs a model compressed with DiViCo and a gap encoder (encoder "
                         "'variational' or 'deterministic'); this one has none.")
    rows: dict[str, list[torch.Tensor]] = {kind: [] for kind in VECTOR_KINDS}

    def collect(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        selected = inputs[0].detach().float().cpu()
        gap = output.detach().float().cpu()
        rows["gap"].append(gap)
        rows["token"].append(selected + gap)
        rows["selected"].append(selected)

    handle = encoder.register_forward_hook(collect)
    try:
        for sample in samples:
            prefill(model, model_inputs(model, processor, sample))
    finally:
        handle.remove()
    return {kind: torch.cat(values) for kind, values in rows.items()}


def independent_reference(rows: int) -> float:
    """The IL that truly independent Gaussian dimensions reach in expectation from ``rows`` samples, ``1 - E|r|``.

    A sample correlation is never exactly 0: for independent normal pairs, r has density proportional to
    (1 - r^2)^((n - 4) / 2), so ``E|r| = Gamma((n - 1) / 2) / (sqrt(pi) Gamma(n / 2))`` (0.5 at n = 4, about
    sqrt(2 / (pi n)) for large n). Compare a measured IL with this value, not with 1.

    Raises
    ------
    ValueError
        If ``rows`` < 3.
    """
    if rows < 3:
        raise ValueError(f"rows must be >= 3, got {rows}.")
    return 1.0 - math.exp(math.lgamma((rows - 1) / 2) - math.lgamma(rows / 2)) / math.sqrt(math.pi)


def _levels(vectors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """IL of each kind (None where undefined, with the reason) and the independent reference for that many rows."""
    rows = int(vectors["gap"].shape[0])
    levels: dict[str, Any] = {"rows": rows, "dims": int(vectors["gap"].shape[1]),
                              "independent_reference": independent_reference(rows) if rows >= 3 else None}
    for kind, values in vectors.items():
        try:
            levels[kind] = information_level(values)
        except ValueError as error:
            levels[kind] = None
            levels[f"{kind}_undefined"] = str(error)
    return levels


@dataclass
class LeakageSource:
    """One set of weights to measure: a configuration, and for a checkpoint its step and trained tensors."""

    name: str
    configuration: EvalConfiguration
    step: int | None = None
    checkpoint: Path | None = None
    logged: list[dict[str, float]] = field(default_factory=list)


def load_checkpoint_tensors(model: nn.Module, checkpoint: Path) -> None:
    """Copy a Trainer checkpoint's trained tensors (``trainable.safetensors``) into a model set up from the run.

    Raises
    ------
    ValueError
        A tensor name the model does not have (the run was trained with other settings).
    """
    tensors = load_file(str(checkpoint / TRAINABLE_WEIGHTS_NAME))
    parameters = dict(unwrap_model(model).named_parameters())
    unknown = sorted(set(tensors) - set(parameters))
    if unknown:
        raise ValueError(f"{checkpoint} holds tensors this model lacks ({unknown[:3]}); was it written by this run?")
    with torch.no_grad():
        for name, tensor in tensors.items():
            parameters[name].copy_(tensor.to(parameters[name].device, parameters[name].dtype))


def run_sources(run_dir: Path) -> list[LeakageSource]:
    """Every checkpoint of a training run in step order, then its final weights (``run_dir`` itself).

    Raises
    ------
    FileNotFoundError
        ``run_dir`` has no ``config.json`` (not a finished divico training run).
    """
    read_saved_config(run_dir)
    configuration = EvalConfiguration(run_dir.name, compressor=run_dir)
    folder = run_dir / CHECKPOINT_SUBDIR
    checkpoints = []
    if folder.is_dir():
        for child in folder.iterdir():
            match = _CHECKPOINT_PATTERN.match(child.name)
            if match and (child / TRAINABLE_WEIGHTS_NAME).is_file():
                checkpoints.append((int(match.group(1)), child))
    sources = [LeakageSource(f"step {step}", configuration, step, path) for step, path in sorted(checkpoints)]
    summary = run_dir / "training_summary.json"
    final_step = json.loads(summary.read_text()).get("saved_step") if summary.is_file() else None
    sources.append(LeakageSource("final", configuration, final_step))
    return sources


def logged_information_level(run_dir: Path) -> list[dict[str, float]]:
    """``{"step", "information_level"}`` entries logged during training (newest checkpoint's trainer_state.json)."""
    folder = run_dir / CHECKPOINT_SUBDIR
    states = sorted(folder.glob("checkpoint-*/trainer_state.json"),
                    key=lambda p: int(p.parent.name.split("-")[-1])) if folder.is_dir() else []
    if not states:
        return []
    history = json.loads(states[-1].read_text()).get("log_history", [])
    return [{"step": int(e["step"]), INFORMATION_LEVEL_KEY: float(e[INFORMATION_LEVEL_KEY])}
            for e in history if INFORMATION_LEVEL_KEY in e]


def leakage_analysis(
    model: nn.Module,
    processor: Any,
    samples: Sequence[AnalysisSample],
    sources: Sequence[LeakageSource],
    show_progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """source name -> IL of each of :data:`VECTOR_KINDS` (and rows, dims, step) over ``samples``."""
    results: dict[str, dict[str, Any]] = {}
    for source in progress(sources, description="leakage", enabled=show_progress):
        with configured(model, source.configuration):
            if source.checkpoint is not None:
                load_checkpoint_tensors(model, source.checkpoint)
            levels = _levels(collect_gap_vectors(model, processor, samples))
        results[source.name] = {"step": source.step, **levels}
    return results


def draw_leakage(results: dict[str, dict[str, Any]], logged: list[dict[str, float]], path: Path) -> Path:
    """IL per source: a curve over the training steps for a run, else bars per compressor."""
    figure, axes = new_figure(1, 1, cell_inches=5.0)
    ax = axes[0, 0]
    names = list(results)
    stepped = all(results[name]["step"] is not None for name in names) and len(names) > 1
    labels = {"gap": "gap v_c' (g_theta's output)", "token": "token v_c = v_s + v_c'", "selected": "kept v_s (no gap)"}
    if stepped:
        steps = [results[name]["step"] for name in names]
        for kind, label in labels.items():
            ax.plot(steps, [results[name][kind] if results[name][kind] is not None else np.nan for name in names],
                    marker="o", label=label)
        if logged:
            ax.plot([e["step"] for e in logged], [e[INFORMATION_LEVEL_KEY] for e in logged], linestyle="--",
                    color="grey", label="gap in training (logged, sampled)")
        ax.plot(steps, [np.nan if results[n]["independent_reference"] is None else results[n]["independent_reference"]
                        for n in names], linestyle=":", color="black", label="independent dims, same number of vectors")
        ax.set_xlabel("training step")
    else:
        positions = np.arange(len(names))
        width = 0.8 / len(labels)
        for offset, (kind, label) in enumerate(labels.items()):
            values = [results[name][kind] if results[name][kind] is not None else np.nan for name in names]
            ax.bar(positions + (offset - 1) * width, values, width, label=label)
        references = [results[name]["independent_reference"] for name in names]
        ax.plot(positions, [np.nan if r is None else r for r in references], linestyle="none", marker="_",
                markersize=40, color="black", label="independent dims, same number of vectors")
        ax.set_xticks(positions, names, rotation=20, fontsize=7)
    ax.set_ylabel("IL (Eq. 16; 1 = independent dimensions)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    ax.set_title("Disentanglement of DiViCo's compressed visual tokens", fontsize=9)
    return save_figure(figure, path)


@register_analysis("leakage")
class LeakageAnalysis(Analysis):
    help = "Fig. 7 / Eq. 16: independence level IL of DiViCo's gap encoding, per compressor or over a training run"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        add_input_arguments(parser, default_limit=32)
        source = parser.add_mutually_exclusive_group(required=True)
        source.add_argument("--compressor", nargs="+", type=Path, default=None, metavar="DIR",
                            help="trained DiViCo compressor folders (each measured with its saved settings)")
        source.add_argument("--run", type=Path, default=None, metavar="DIR",
                            help="a divico train output folder: IL at each of its checkpoints and its final weights")

    def run(self, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
        if args.run is not None:
            sources = run_sources(args.run)
            logged = logged_information_level(args.run)
        else:
            for directory in args.compressor:
                read_saved_config(directory)
            sources = [LeakageSource(directory.name, EvalConfiguration(directory.name, compressor=directory))
                       for directory in args.compressor]
            logged = []
        names = [source.name for source in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"Compressor folder names must differ (they label the results), got {names}.")
        samples = load_samples_from_args(args)
        model, processor = load_model_from_args(args)
        results = leakage_analysis(model, processor, samples, sources, show_progress=not args.no_progress)
        figure = draw_leakage(results, logged, out_dir / "leakage.png")
        summary = {"analysis": "leakage", "model": args.model, "merge": args.merge, "num_prompts": len(samples),
                   "results": results, "logged_during_training": logged, "figures": {"leakage": str(figure)},
                   "headline": {name: {kind: r[kind] for kind in VECTOR_KINDS} for name, r in results.items()}}
        write_json(out_dir / "leakage.json", summary)
        return summary
