"""Fig. 5: t-SNE of the next-token probability distributions of the first N questions, clean and under the paper's
noise (:mod:`divico.perturbation`), for FastV and DiViCo at one rate, and how far the noise moves them.

For every configuration and question, one prefill forward gives ``p`` (clean) and ``q`` (noisy): the softmax of the
last prompt position's logits, i.e. the distribution of the answer's first token. The shift is measured in the
probability space, not in the picture (t-SNE distances are not faithful):

* ``mean_symmetric_kl``: the mean over questions of ``(KL(p || q) + KL(q || p)) / 2`` in nats (the headline);
* ``mean_l2``: the mean of ``||p - q||_2``; ``mean_total_variation``: the mean of ``||p - q||_1 / 2``;
* ``top1_changed``: the share of questions whose most likely token changes.

The t-SNE (scikit-learn, one joint embedding of all configurations' clean and noisy points, so the panels share
one map) runs on the distributions restricted to the union of every distribution's :data:`TOP_TOKENS` most likely
tokens, plus one column with the remaining mass. Files: ``tsne.png`` (one panel per configuration, each question's
clean and noisy point joined by a line, the mean shift in the title) and ``tsne.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.manifold import TSNE
from torch import nn

from divico.analysis.base import Analysis, register_analysis
from divico.analysis.common import (
    AnalysisSample,
    add_input_arguments,
    load_model_from_args,
    load_samples_from_args,
    model_inputs,
    new_figure,
    progress,
    save_figure,
    write_json,
)
from divico.analysis.noise import PAPER_KEEP_RATIO
from divico.config import CompressionConfig
from divico.evaluation.benchmark import SHORT_ANSWER_INSTRUCTION
from divico.evaluation.runner import EvalConfiguration, configured
from divico.perturbation import NOISE_KINDS, NoiseConfig, perturbed

__all__ = ["TOP_TOKENS", "distribution_shift", "next_token_log_probs", "noise_tsne", "tsne_embedding"]

FIGURE_NAME = "tsne.png"
JSON_NAME = "tsne.json"
#: Most likely tokens per distribution kept for the t-SNE (the union over all distributions, + one rest column).
TOP_TOKENS = 100


@torch.no_grad()
def next_token_log_probs(model: nn.Module, processor: Any, samples: Sequence[AnalysisSample], *,
                         show_progress: bool = False, description: str = "next token") -> torch.Tensor:
    """(N, V) float64 log-probabilities of the token after each sample's prompt (one prefill forward each).

    Parameters
    ----------
    model, processor
        The model as configured (compressed, perturbed or not) and its processor.
    samples
        N samples (one image and a prompt each).
    """
    rows = []
    for sample in progress(samples, description=description, enabled=show_progress):
        logits = model(**model_inputs(model, processor, sample)).logits[0, -1]
        rows.append(torch.log_softmax(logits.double(), dim=-1).cpu())
    return torch.stack(rows)


def distribution_shift(clean: torch.Tensor, noisy: torch.Tensor) -> dict[str, Any]:
    """How far ``noisy`` lies from ``clean``, question by question and on average.

    Parameters
    ----------
    clean, noisy
        (N, V) log-probabilities of the same questions.

    Returns
    -------
    dict
        ``mean_symmetric_kl``, ``mean_l2``, ``mean_total_variation``, ``top1_changed`` (share, 0 to 1), and the
        per-question ``symmetric_kl`` / ``l2`` lists.
    """
    if clean.shape != noisy.shape or clean.dim() != 2:
        raise ValueError(f"clean and noisy must both be (N, V); got {tuple(clean.shape)} and {tuple(noisy.shape)}.")
    p, q = clean.exp(), noisy.exp()
    kl_pq = (p * (clean - noisy)).sum(-1)
    kl_qp = (q * (noisy - clean)).sum(-1)
    symmetric = 0.5 * (kl_pq + kl_qp)
    l2 = (p - q).norm(dim=-1)
    return {
        "mean_symmetric_kl": float(symmetric.mean()),
        "mean_l2": float(l2.mean()),
        "mean_total_variation": float(0.5 * (p - q).abs().sum(-1).mean()),
        "top1_changed": float((clean.argmax(-1) != noisy.argmax(-1)).double().mean()),
        "symmetric_kl": symmetric.tolist(),
        "l2": l2.tolist(),
    }


def tsne_embedding(log_probs: torch.Tensor, *, seed: int = 0, top_tokens: int = TOP_TOKENS) -> np.ndarray:
    """(M, 2) t-SNE of M distributions given as (M, V) log-probabilities (columns reduced as the module says).

    Raises
    ------
    ValueError
        Fewer than 4 distributions (t-SNE needs a perplexity below the number of points).
    """
    count = log_probs.shape[0]
    if count < 4:
        raise ValueError(f"t-SNE needs at least 4 distributions, got {count}; ask more questions (--limit).")
    probabilities = log_probs.exp()
    columns = torch.unique(probabilities.topk(min(top_tokens, probabilities.shape[1]), dim=-1).indices)
    kept = probabilities[:, columns]
    reduced = torch.cat([kept, (1.0 - kept.sum(-1, keepdim=True)).clamp(min=0.0)], dim=1).float().numpy()
    perplexity = float(min(30.0, max(1.0, (count - 1) / 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(reduced)


def _plot(summary: dict[str, Any], points: np.ndarray, count: int, path: Path) -> Path:
    names = summary["configurations"]
    figure, axes = new_figure(1, len(names), cell_inches=3.6)
    for index, name in enumerate(names):
        axis = axes[0, index]
        clean = points[(2 * index) * count:(2 * index + 1) * count]
        noisy = points[(2 * index + 1) * count:(2 * index + 2) * count]
        for (x0, y0), (x1, y1) in zip(clean, noisy, strict=True):
            axis.plot([x0, x1], [y0, y1], color="0.75", linewidth=0.6, zorder=1)
        axis.scatter(clean[:, 0], clean[:, 1], s=12, color="tab:blue", label="clean", zorder=2)
        axis.scatter(noisy[:, 0], noisy[:, 1], s=12, color="tab:red", marker="x", label="noisy", zorder=3)
        shift = summary["shift"][name]
        axis.set_title(f"{name}\nmean sym. KL {shift['mean_symmetric_kl']:.3f} nats, "
                       f"L2 {shift['mean_l2']:.3f}", fontsize=9)
        axis.set_xticks([])
        axis.set_yticks([])
        axis.legend(fontsize=7, loc="best")
    noise = summary["noise"]
    figure.suptitle(f"Next-token distributions of {count} questions, clean vs noise (sigma {noise['sigma']:g}, "
                    f"{noise['kind']}); t-SNE", fontsize=9)
    return save_figure(figure, path)


def noise_tsne(
    model: nn.Module,
    processor: Any,
    samples: Sequence[AnalysisSample],
    configurations: Sequence[EvalConfiguration],
    out_dir: str | Path,
    *,
    noise: NoiseConfig,
    seed: int = 0,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Clean and noisy next-token distributions of ``samples`` under each configuration, their shift, the t-SNE.

    Parameters
    ----------
    model, processor
        The stock model and its processor.
    samples
        The questions (N >= 2).
    configurations
        E.g. FastV and DiViCo at the paper's rate (without noise: the analysis adds it); names unique.
    out_dir
        Output folder (``tsne.png``, ``tsne.json``).
    noise
        The perturbation (sigma 0: every shift is exactly 0).
    seed
        The t-SNE's random state.

    Returns
    -------
    dict
        The content of ``tsne.json``: ``configurations``, ``samples``, ``noise``, ``shift`` (configuration ->
        :func:`distribution_shift`), ``points`` (configuration -> clean / noisy (N, 2) coordinates),
        ``shift_definition``, ``figures``, ``headline``.
    """
    names = [c.name for c in configurations]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"Give one or more configurations with unique names, got {names}.")
    out = Path(out_dir)
    rows = []
    summary: dict[str, Any] = {"configurations": names, "samples": [s.sample_id for s in samples],
                               "noise": noise.to_dict(), "shift": {}, "points": {}}
    for configuration in configurations:
        with configured(model, configuration):
            clean = next_token_log_probs(model, processor, samples, show_progress=show_progress,
                                         description=f"{configuration.name} clean")
            with perturbed(model, noise):
                noisy = next_token_log_probs(model, processor, samples, show_progress=show_progress,
                                             description=f"{configuration.name} noisy")
        summary["shift"][configuration.name] = distribution_shift(clean, noisy)
        rows += [clean, noisy]
    points = tsne_embedding(torch.cat(rows), seed=seed)
    count = len(samples)
    for index, name in enumerate(names):
        summary["points"][name] = {"clean": points[2 * index * count:(2 * index + 1) * count].tolist(),
                                   "noisy": points[(2 * index + 1) * count:(2 * index + 2) * count].tolist()}
    summary["shift_definition"] = ("mean over questions of (KL(p||q) + KL(q||p)) / 2 in nats, p / q the clean / noisy "
                                   "next-token distributions; also mean ||p - q||_2 and total variation")
    summary["figures"] = {"tsne": str(_plot(summary, points, count, out / FIGURE_NAME))}
    summary["headline"] = {f"mean symmetric KL (nats), {name}": summary["shift"][name]["mean_symmetric_kl"]
                           for name in names}
    write_json(out / JSON_NAME, summary)
    return summary


@register_analysis("tsne")
class TsneAnalysis(Analysis):
    """``divico analyze tsne``: Fig. 5."""

    help = "Fig. 5: t-SNE of next-token distributions, clean vs noisy input, FastV vs DiViCo, with the mean shift"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        add_input_arguments(parser, default_limit=100)
        parser.add_argument("--instruction", default=SHORT_ANSWER_INSTRUCTION,
                            help="line appended to every prompt (default LLaVA-1.5's short-answer instruction; '' for "
                            "none)")
        parser.add_argument("--keep-ratio", type=float, default=PAPER_KEEP_RATIO,
                            help="FastV's share of visual tokens kept (default 1/9: the paper's 88.9%% rate)")
        parser.add_argument("--layer", type=int, default=2, help="FastV's K (default 2)")
        parser.add_argument("--divico", type=Path, default=None, metavar="DIR",
                            help="the trained DiViCo compressor (default: COMPRESSORS/divico-TAG)")
        parser.add_argument("--compressors", type=Path, default=None, metavar="DIR",
                            help="folder of trained compressors (the default model: "
                            "testbed/src/divico_testbed/assets/default/compressors)")
        parser.add_argument("--tag", default="keep11.1", help="rate tag of the compressor folder (default keep11.1)")
        parser.add_argument("--sigma", type=float, default=1.0, help="noise scale (default 1: standard Gaussian)")
        parser.add_argument("--noise-kind", default="features", choices=NOISE_KINDS,
                            help="features (the projector's output, the paper's) or pixels")
        parser.add_argument("--noise-seed", type=int, default=0, help="seed of the noise (default 0)")
        parser.add_argument("--seed", type=int, default=0, help="t-SNE random state (default 0)")

    def run(self, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
        noise = NoiseConfig(args.sigma, args.noise_kind, args.noise_seed)
        divico_dir = args.divico
        if divico_dir is None:
            if args.compressors is None:
                raise ValueError("Give the trained DiViCo: --divico DIR or --compressors DIR (with DIR/divico-TAG).")
            divico_dir = args.compressors / f"divico-{args.tag}"
        configurations = [
            EvalConfiguration("FastV", compression=CompressionConfig("fastv", keep_ratio=args.keep_ratio,
                                                                      layer=args.layer)),
            EvalConfiguration("DiViCo", compressor=divico_dir),
        ]
        samples = load_samples_from_args(args)
        if args.instruction:
            samples = [dataclasses.replace(s, prompt=f"{s.prompt}\n{args.instruction}") for s in samples]
        model, processor = load_model_from_args(args)
        return noise_tsne(model, processor, samples, configurations, out_dir, noise=noise, seed=args.seed,
                          show_progress=not args.no_progress)
