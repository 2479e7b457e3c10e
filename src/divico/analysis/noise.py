"""Table II: scores of the uncompressed model, FastV, DeCo and DiViCo with and without the paper's perturbation
(:mod:`divico.perturbation`), and the relative drop each method suffers.

Scoring reuses the evaluation runner (:func:`divico.evaluation.runner.compare_configurations`): every configuration
is answered clean and with noise into ``OUT/runs/<configuration>/<benchmark>/`` (predictions, ``run_config.json``
with the noise, ``scores.json``), so an interrupted analysis resumes. The benchmarks are either registered ones read
from their official files (``--data-root``), or mini-benchmark *records* (``--records``): one JSONL file per
benchmark and split, ``<DIR>/<benchmark>/<split>.jsonl``, in the record format :func:`divico.metrics.score_benchmark`
scores (the default model's testbed writes them with ``divico make-data``; ``divico demo`` caches them in
``~/.cache/divico/demo-data``).

Files: ``noise_table.md`` (Table II's layout: each method, then the method + noise with the relative drop),
``noise.json`` (scores, drops, their means, the noise and the benchmark sizes), ``noise.png`` (the drops as bars).

The relative drop of a score ``s`` to ``s'`` under noise is ``100 * (s - s') / |s|`` percent (positive: the score
fell), as Table II's arrows.

This module also holds what the score-based analyses share: :class:`RecordsBenchmark`, :func:`benchmarks_from_args`,
:func:`divico.evaluation.runner.score_configurations` and :func:`headline_scores`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from divico.analysis.base import Analysis, register_analysis
from divico.analysis.common import load_model_from_args, new_figure, save_figure, write_json
from divico.config import CompressionConfig
from divico.evaluation.benchmark import (
    SHORT_ANSWER_INSTRUCTION,
    Benchmark,
    BenchmarkDataError,
    Sample,
    available_benchmarks,
    get_benchmark,
    read_jsonl,
)
from divico.evaluation.runner import EvalConfiguration, score_configurations
from divico.metrics import BENCHMARK_NAMES, score_benchmark
from divico.perturbation import NOISE_KINDS, NoiseConfig

__all__ = [
    "PAPER_KEEP_RATIO",
    "RecordsBenchmark",
    "add_benchmark_arguments",
    "benchmarks_from_args",
    "format_noise_table",
    "headline_scores",
    "noise_robustness",
    "plot_noise_drops",
    "relative_drop",
]

TABLE_NAME = "noise_table.md"
JSON_NAME = "noise.json"
FIGURE_NAME = "noise.png"
#: The paper's Table II / Fig. 5 rate: 64 of 576 tokens kept (88.9% removed).
PAPER_KEEP_RATIO = 1 / 9
#: Splits of a records folder.
RECORD_SPLITS = ("train", "validation", "test")
#: The multiple-choice instruction of the records' MMBench (answer by the option's text, as the default model learnt).
OPTION_TEXT_INSTRUCTION = "Answer with the option's text from the given choices directly."
OPTION_LETTERS = "ABCDEFGHIJ"
NOISY_SUFFIX = "+noise"


# -- mini-benchmark records -------------------------------------------------------------------------------------

class RecordsBenchmark(Benchmark):
    """A mini-benchmark given as records, ``<data_root>/<name>/<split>.jsonl``, scored by
    :func:`divico.metrics.score_benchmark` (not registered: one instance per benchmark name).

    Each record has ``id``, ``question``, ``image`` (relative to ``data_root``) and the fields its benchmark's scorer
    reads (``answers``; ``answer``; MMBench ``options`` and ``circular_group``; MME ``image`` pairs). Prompt: the
    question and LLaVA-1.5's short-answer instruction; MMBench: the question, ``A. option`` lines and the option-text
    instruction.

    Parameters
    ----------
    data_root
        The records folder.
    name
        One of :data:`divico.metrics.BENCHMARK_NAMES`.
    split
        One of :data:`RECORD_SPLITS` (default ``test``).
    groups
        Keep only the first ``groups`` scoring groups (a question; an MMBench circular group; an MME image's pair),
        >= 1; None: all. Groups stay whole, so the circular and paired scores stay defined.
    rules
        ``official`` or ``lenient`` scoring rules.
    """

    splits = RECORD_SPLITS
    default_split = "test"
    default_max_new_tokens = 8  # as divico demo answers the mini-benchmarks
    option_defaults = {"rules": "official", "groups": None}

    def __init__(self, data_root: Path | str, name: str, split: str | None = None, **options: Any) -> None:
        if name not in BENCHMARK_NAMES:
            raise ValueError(f"Unknown records benchmark {name!r}; valid: {', '.join(BENCHMARK_NAMES)}.")
        self.name = name  # type: ignore[misc]  # one instance per benchmark of a records folder
        super().__init__(data_root, split=split, **options)
        groups = self.options["groups"]
        if groups is not None and (isinstance(groups, bool) or not isinstance(groups, int) or groups < 1):
            raise ValueError(f"groups must be an integer >= 1 (or None for all), got {groups!r}.")

    def files(self) -> dict[str, Path]:
        return {"records": self.root / self.name / f"{self.split}.jsonl"}

    @staticmethod
    def group_key(record: Mapping[str, Any]) -> str:
        """The scoring group of a record: records scored together are kept together."""
        if record.get("benchmark") == "mmbench" or "circular_group" in record:
            return str(record.get("circular_group", record["id"]))
        if record.get("benchmark") == "mme":
            return str(record["image"])
        return str(record["id"])

    @staticmethod
    def prompt(record: Mapping[str, Any]) -> str:
        """The user text of a record (after the image)."""
        options = record.get("options")
        if options:
            lines = [f"{OPTION_LETTERS[index]}. {option}" for index, option in enumerate(options)]
            return "\n".join([str(record["question"]), *lines, OPTION_TEXT_INSTRUCTION])
        return f"{record['question']}\n{SHORT_ANSWER_INSTRUCTION}"

    def load(self) -> list[Sample]:
        path = self.files()["records"]
        groups_wanted = self.options["groups"]
        seen: set[str] = set()
        samples = []
        for line, record in read_jsonl(path, f"{self.name} records"):
            missing = [key for key in ("id", "question", "image") if key not in record]
            if missing:
                raise BenchmarkDataError(f"{path}, line {line}: record lacks {missing}.")
            key = self.group_key(record)
            if key not in seen:
                if groups_wanted is not None and len(seen) == groups_wanted:
                    continue
                seen.add(key)
            samples.append(Sample(question_id=str(record["id"]), prompt=self.prompt(record),
                                  images=(self.data_root / record["image"],), reference=record))
        if not samples:
            raise BenchmarkDataError(f"{path} holds no records.")
        return samples

    def score(self, predictions: Mapping[str, str], samples: Sequence[Sample], *, judge: Any = None) -> dict[str, Any]:
        answers = self.require_predictions(predictions, samples)
        return score_benchmark(self.name, answers, [s.reference for s in samples], rules=self.options["rules"])


# -- shared command-line pieces ---------------------------------------------------------------------------------

def add_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    """``--benchmark``, ``--data-root`` | ``--records``, ``--split``, ``--limit``, ``--batch-size``,
    ``--max-new-tokens`` (the scoring options of the score-based analyses; ``divico analyze`` adds ``--model``,
    ``--merge``, ``--out``, ``--no-progress``)."""
    parser.add_argument("--benchmark", nargs="+", required=True, metavar="NAME",
                        help=f"benchmarks: registered ones with --data-root ({', '.join(available_benchmarks())}) "
                        f"or records benchmarks with --records ({', '.join(BENCHMARK_NAMES)})")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-root", type=Path, metavar="DIR",
                        help="folder of the benchmarks' official files (LLaVA-1.5's playground/data/eval layout)")
    source.add_argument("--records", type=Path, metavar="DIR",
                        help="mini-benchmark records folder, DIR/<benchmark>/<split>.jsonl (divico make-data)")
    parser.add_argument("--split", default=None, help="split of every benchmark (default: each one's default)")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="first N questions of each benchmark (records: first N scoring groups)")
    parser.add_argument("--batch-size", type=int, default=8, help="questions per generate call (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="generation budget (default: per benchmark)")


def benchmarks_from_args(args: argparse.Namespace) -> list[Benchmark]:
    """The benchmark instances of :func:`add_benchmark_arguments`' options.

    Raises
    ------
    ValueError
        An unknown benchmark name, split or a bad ``--limit``.
    """
    if getattr(args, "records", None) is not None:
        return [RecordsBenchmark(args.records, name, split=args.split, groups=args.limit) for name in args.benchmark]
    return [get_benchmark(name)(args.data_root, split=args.split) for name in args.benchmark]


def runner_limit(args: argparse.Namespace) -> int | None:
    """The runner's ``limit`` (records benchmarks limit by scoring groups themselves)."""
    return None if getattr(args, "records", None) is not None else args.limit


def headline_scores(results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, float | None]]:
    """``configuration -> benchmark -> headline score`` from :func:`compare_configurations`' results."""
    return {name: {benchmark: (None if result["scores"].get("score") is None else float(result["scores"]["score"]))
                   for benchmark, result in per_benchmark.items()}
            for name, per_benchmark in results.items()}


def question_counts(results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, int]:
    """``benchmark -> questions scored`` of the first configuration."""
    first = next(iter(results.values()))
    return {benchmark: int(result["scores"].get("n", 0)) for benchmark, result in first.items()}


# -- Table II ---------------------------------------------------------------------------------------------------

def relative_drop(clean: float | None, noisy: float | None) -> float | None:
    """``100 * (clean - noisy) / |clean|`` in percent (positive: the score fell); None when undefined (a missing
    score or a clean score of 0)."""
    if clean is None or noisy is None or clean == 0:
        return None
    return 100.0 * (clean - noisy) / abs(clean)


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def format_noise_table(summary: Mapping[str, Any]) -> str:
    """Table II's layout: a row per configuration and one per configuration + noise with ``(↓ drop%)`` cells."""
    benchmarks = summary["benchmarks"]

    def score_cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    def drop_cell(value: float | None) -> str:
        if value is None:
            return ""
        return f" (↓ {value:.2f}%)" if value >= 0 else f" (↑ {-value:.2f}%)"

    lines = ["| Method | " + " | ".join(benchmarks) + " | Mean drop |", "|" + "---|" * (len(benchmarks) + 2)]
    for name in summary["configurations"]:
        clean, noisy, drops = (summary["scores"][name], summary["noisy_scores"][name],
                               summary["relative_drop_percent"][name])
        mean = summary["mean_relative_drop_percent"][name]
        lines.append(f"| {name} | " + " | ".join(score_cell(clean[b]) for b in benchmarks) + " | |")
        lines.append(f"| {name}{NOISY_SUFFIX} | "
                     + " | ".join(score_cell(noisy[b]) + drop_cell(drops[b]) for b in benchmarks)
                     + f" | {'-' if mean is None else f'{mean:.2f}%'} |")
    noise = summary["noise"]
    lines.append("")
    lines.append(f"Noise: sigma {noise['sigma']:g} x N(0, 1) on the {noise['kind']} (seed {noise['seed']}); "
                 f"questions per benchmark: {', '.join(f'{b} {n}' for b, n in summary['questions'].items())}.")
    return "\n".join(lines)


def plot_noise_drops(summary: Mapping[str, Any], path: Path) -> Path:
    """Grouped bars: each configuration's relative drop per benchmark and its mean."""
    benchmarks = [*summary["benchmarks"], "mean"]
    names = summary["configurations"]
    width = 0.8 / max(len(names), 1)
    figure, axes = new_figure(1, 1)
    figure.set_size_inches(1.6 + 1.3 * len(benchmarks), 3.6)
    axis = axes[0, 0]
    positions = np.arange(len(benchmarks))
    for index, name in enumerate(names):
        drops = summary["relative_drop_percent"][name]
        values = [drops[b] for b in summary["benchmarks"]] + [summary["mean_relative_drop_percent"][name]]
        heights = [math.nan if v is None else v for v in values]
        axis.bar(positions + (index - (len(names) - 1) / 2) * width, heights, width, label=name)
    axis.axhline(0.0, color="black", linewidth=0.8)
    axis.set_xticks(positions, benchmarks)
    axis.set_ylabel("relative drop under noise (%)")
    noise = summary["noise"]
    axis.set_title(f"Score drop under noise (sigma {noise['sigma']:g}, {noise['kind']})")
    axis.legend(fontsize=8)
    return save_figure(figure, path)


def noise_robustness(
    model: nn.Module,
    processor: Any,
    configurations: Sequence[EvalConfiguration],
    benchmarks: Sequence[Benchmark],
    out_dir: str | Path,
    *,
    noise: NoiseConfig,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    show_progress: bool = True,
    run_info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Score every configuration clean and under ``noise``; write the Table-II markdown, JSON and bar chart.

    Parameters
    ----------
    model, processor
        The stock model (no compression, no LoRA) and its processor.
    configurations
        Clean configurations in table order (e.g. baseline, FastV, DeCo, DiViCo), without noise; names unique.
    benchmarks
        Benchmark instances.
    out_dir
        Output folder: the files above, and the runner's folders under ``runs/``.
    noise
        The perturbation (sigma 0 reproduces the clean scores exactly).
    limit, batch_size, max_new_tokens, show_progress, run_info
        As :func:`divico.evaluation.runner.evaluate_benchmark`.

    Returns
    -------
    dict
        The content of ``noise.json``: ``benchmarks``, ``configurations``, ``scores`` / ``noisy_scores``
        (configuration -> benchmark -> score), ``relative_drop_percent``, ``mean_relative_drop_percent``,
        ``noise``, ``questions``, ``files``.

    Raises
    ------
    ValueError
        A configuration that already carries noise, or names that repeat.
    """
    carrying = [c.name for c in configurations if c.noise is not None]
    if carrying:
        raise ValueError(f"Configurations {carrying} already carry noise; give the clean ones (the analysis adds it).")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs: list[EvalConfiguration] = []
    for configuration in configurations:
        runs += [configuration, dataclasses.replace(configuration, name=configuration.name + NOISY_SUFFIX, noise=noise)]
    results = score_configurations(model, processor, runs, benchmarks, out / "runs", limit=limit,
                                   batch_size=batch_size, max_new_tokens=max_new_tokens,
                                   show_progress=show_progress, run_info=dict(run_info or {}))
    scores = headline_scores(results)
    names = [c.name for c in configurations]
    benchmark_names = [b.name for b in benchmarks]
    drops = {name: {b: relative_drop(scores[name][b], scores[name + NOISY_SUFFIX][b]) for b in benchmark_names}
             for name in names}
    summary: dict[str, Any] = {
        "benchmarks": benchmark_names,
        "configurations": names,
        "scores": {name: scores[name] for name in names},
        "noisy_scores": {name: scores[name + NOISY_SUFFIX] for name in names},
        "relative_drop_percent": drops,
        "mean_relative_drop_percent": {name: _mean(list(drops[name].values())) for name in names},
        "noise": noise.to_dict(),
        "questions": question_counts(results),
        "drop_definition": "100 * (clean - noisy) / |clean| percent; positive = the score fell",
    }
    (out / TABLE_NAME).write_text(format_noise_table(summary) + "\n", encoding="utf-8")
    plot_noise_drops(summary, out / FIGURE_NAME)
    summary["figures"] = {"drops": str(out / FIGURE_NAME), "table": str(out / TABLE_NAME)}
    summary["headline"] = {f"mean relative drop (%), {name}": summary["mean_relative_drop_percent"][name]
                           for name in names}
    write_json(out / JSON_NAME, summary)
    return summary


def paper_configurations(keep_ratio: float, layer: int, compressors: Path | None, tag: str,
                         extra: Sequence[str] = ()) -> list[EvalConfiguration]:
    """Table II's rows: Baseline, FastV at ``keep_ratio``, and DeCo / DiViCo from ``compressors/<method>-<tag>``
    where those folders exist (the layout the default model's testbed trains); then ``extra`` ``--compare`` specs.
    """
    rows = [EvalConfiguration("Baseline"),
            EvalConfiguration("FastV", compression=CompressionConfig("fastv", keep_ratio=keep_ratio, layer=layer))]
    if compressors is not None:
        for title, method in (("DeCo", "deco"), ("DiViCo", "divico")):
            folder = Path(compressors) / f"{method}-{tag}"
            if not (folder / "config.json").is_file():
                raise FileNotFoundError(f"No trained {title} at {folder} (expected {method}-{tag}/config.json under "
                                        f"--compressors {compressors}).")
            rows.append(EvalConfiguration(title, compressor=folder))
    rows += [EvalConfiguration.parse(spec, default_layer=layer) for spec in extra]
    return rows


def add_configuration_arguments(parser: argparse.ArgumentParser) -> None:
    """``--keep-ratio``, ``--layer``, ``--compressors``, ``--tag``, ``--compare``."""
    parser.add_argument("--keep-ratio", type=float, default=PAPER_KEEP_RATIO,
                        help="FastV's share of visual tokens kept (default 1/9: the paper's 88.9%% rate)")
    parser.add_argument("--layer", type=int, default=2, help="K of FastV (default 2)")
    parser.add_argument("--compressors", type=Path, default=None, metavar="DIR",
                        help="folder with trained deco-TAG and divico-TAG compressors (the default model: "
                        "testbed/src/divico_testbed/assets/default/compressors)")
    parser.add_argument("--tag", default="keep11.1", help="rate tag of the compressor folders (default keep11.1)")
    parser.add_argument("--compare", nargs="*", default=(), metavar="CONFIG",
                        help="further configurations, as divico eval --compare (LABEL=METHOD:KEEP[:OPTION...] | DIR)")


@register_analysis("noise")
class NoiseAnalysis(Analysis):
    """``divico analyze noise``: Table II."""

    help = "Table II: scores with and without Gaussian noise on the visual features, and the relative drops"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        add_benchmark_arguments(parser)
        add_configuration_arguments(parser)
        parser.add_argument("--sigma", type=float, default=1.0,
                            help="noise scale: sigma x N(0, 1) (default 1, the paper's standard Gaussian)")
        parser.add_argument("--noise-kind", default="features", choices=NOISE_KINDS,
                            help="features (the projector's output, the paper's) or pixels")
        parser.add_argument("--noise-seed", type=int, default=0, help="seed of the noise (default 0)")

    def run(self, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
        noise = NoiseConfig(args.sigma, args.noise_kind, args.noise_seed)
        configurations = paper_configurations(args.keep_ratio, args.layer, args.compressors, args.tag, args.compare)
        benchmarks = benchmarks_from_args(args)
        model, processor = load_model_from_args(args)
        return noise_robustness(model, processor, configurations, benchmarks, out_dir, noise=noise,
                                limit=runner_limit(args), batch_size=args.batch_size,
                                max_new_tokens=args.max_new_tokens, show_progress=not args.no_progress,
                                run_info={"model_name": args.model,
                                          "merged": None if args.merge is None else str(args.merge)})
