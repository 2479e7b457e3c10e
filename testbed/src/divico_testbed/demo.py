"""`divico demo`: accuracy kept vs. speed gained on the trained default model (the paper's Tables I and III).

Evaluates the uncompressed base model, FastV (training-free), DeCo and DiViCo (trained checkpoints shipped in
``divico_testbed/assets/default``) at the paper's three rates on held-out test slices of the mini-benchmarks (or,
with ``limit=None``, the whole test splits), and prints:

* Table I: every score with its 95% bootstrap interval over scoring groups (:mod:`divico_testbed.statistics`);
* the paired differences of every method from FastV and from DeCo at the same rate (paired bootstrap over the
  same questions; ``*`` where the interval excludes 0);
* label-free fidelity: the share of answers equal to the uncompressed model's, and the mean KL of the first answer
  token's distribution to the uncompressed model's (:func:`divico_testbed.evaluation.first_token_kl`);
* Table III: analytic FLOPs, peak memory and prefill latency (batch 1, one VQAv2 prompt).

Reproducible figures: answers are generated in float32 on every machine (bf16 roundings differ between CPUs with
and without native bf16 and changed the printed scores). The timing table uses bf16 only where the CPU computes
it natively (AVX512-BF16 or AMX, :func:`cpu_supports_native_bf16`), else float32, and measures every configuration
in interleaved rounds (one call of each per round, in a new random order each round) and reports medians with
their interquartile range, so a slow spell of a shared machine spreads over all configurations instead of
inverting two of them.

Every answered batch is appended to ``<out>/predictions/<run>-<settings key>.jsonl``, so an interrupted demo
resumes without answering anything twice; the tables, ``results.json`` and ``demo.png`` are written at the end.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import divico
import numpy as np
import torch
from divico.efficiency import PromptShape, count_flops, measure_peak_memory
from divico.registry import available_methods, get_method_class
from matplotlib.figure import Figure
from PIL import Image
from torch import nn

from divico_testbed.data import (
    DATA_FORMAT,
    DEFAULT_TEST_GROUPS,
    benchmark_data_current,
    load_eval_records,
    sizes_for_test_groups,
    write_benchmark_splits,
)
from divico_testbed.default_model import default_cache_root
from divico_testbed.evaluation import (
    FIRST_TOKEN_TOP_K,
    EvaluationResult,
    answer_agreement,
    best_constant_scores,
    chat_prompt,
    evaluate_benchmarks,
    scoring_group_key,
)
from divico_testbed.recipe import (
    ABLATION_TAG,
    ASSETS_DIR,
    KL_MEAN_ABLATION,
    PAPER_KEEP_RATIOS,
    load_trained_default,
)
from divico_testbed.statistics import GroupedScore, percentile_interval, resample_indices
from divico_testbed.vision_cache import VisionFeatureCache

BENCHMARK_ORDER = ("vqav2", "pope", "mmbench", "mme", "gqa")
BENCHMARK_TITLES = {"vqav2": "VQAv2", "pope": "POPE", "mmbench": "MMBench", "mme": "MME", "gqa": "GQA"}
#: Table III's accuracy column, and the benchmark whose first test prompt is timed.
EFFICIENCY_BENCHMARK = "vqav2"
#: The paper's comparison: DiViCo against the best of the two baselines at each rate; paired differences are taken
#: from each of them.
BASELINE_METHODS = ("fastv", "deco")
PROPOSED_METHOD = "divico"
#: Registered methods the demo runs without a checkpoint (training-free) and with a shipped one.
TRAINING_FREE_METHODS = ("fastv",)
TRAINED_METHODS = ("deco", "divico")
#: The demo's own run names, which are no registered method: the uncompressed model, the Fig. 8 ablation
#: variants (a: FastV + LoRA, a trained FastV; b: DiViCo with a deterministic encoder) and DiViCo trained with the
#: pre-Eq.-8 KL (mean over dimensions), each a trained checkpoint.
RUN_TITLES = {"baseline": "Baseline", "variant_a": "w/o DC (a)", "variant_b": "w/o DE (b)",
              KL_MEAN_ABLATION: "DiViCo, KL mean"}
#: Ablation runs trained at every rate, and those trained at ABLATION_TAG only.
EVERY_RATE_VARIANTS = ("variant_a",)
ABLATION_RATE_VARIANTS = ("variant_b", KL_MEAN_ABLATION)
ABLATION_VARIANTS = (*EVERY_RATE_VARIANTS, *ABLATION_RATE_VARIANTS)
#: FastV's selection with LoRA trained like DiViCo's: the reference that tells what DiViCo's gap encoder adds.
TRAINED_FASTV = "variant_a"
UNCOMPRESSED_RUN = "baseline"
MAX_NEW_TOKENS = 8
SCORE_DTYPES = ("float32", "bfloat16")
TIMING_DTYPES = ("auto", "bfloat16", "float32")
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: /proc/cpuinfo flags of CPUs that compute bf16 matrix products natively (elsewhere bf16 is emulated, ~3.5x
#: slower than float32 on an AVX2-only CPU of this kind).
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def method_title(method: str) -> str:
    """Display name of a table row's method: the demo's own run names, else the registered method's title."""
    return RUN_TITLES[method] if method in RUN_TITLES else get_method_class(method).title()


def cpu_supports_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU computes bf16 natively (an ``avx512_bf16`` or ``amx_bf16`` flag in ``/proc/cpuinfo``).

    Parameters
    ----------
    cpuinfo
        The text of ``/proc/cpuinfo``; read from the file when None (no such file, e.g. macOS: False).
    """
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text(errors="replace") if path.is_file() else ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            flags.update(value.split())
    return bool(flags & NATIVE_BF16_FLAGS)


def resolve_timing_dtype(requested: str, cpuinfo: str | None = None) -> str:
    """``"auto"`` -> ``"bfloat16"`` where the CPU computes it natively (:func:`cpu_supports_native_bf16`), else
    ``"float32"``; an explicit dtype is returned as it is."""
    if requested not in TIMING_DTYPES:
        raise ValueError(f"timing dtype must be one of {list(TIMING_DTYPES)}, got {requested!r}.")
    if requested != "auto":
        return requested
    return "bfloat16" if cpu_supports_native_bf16(cpuinfo) else "float32"


@dataclass
class DemoConfig:
    """What the demo runs.

    Attributes
    ----------
    out_dir
        Where predictions/, tables.md, results.json and demo.png go.
    assets_dir
        Trained checkpoints (default: the ones shipped in the package).
    data_dir
        Mini-benchmark data (generated with seed 0 if missing or of other sizes; default ``<cache>/demo-data``).
    limit
        Scoring groups per benchmark (a question; an MMBench circular group; an MME image pair); None = the whole
        test split.
    test_groups
        Scoring groups per benchmark of the generated test split (:func:`divico_testbed.data.sizes_for_test_groups`); the
        first ``limit`` of them do not depend on it.
    batch_size
        Generation batch size.
    score_dtype
        Dtype of the answers that are scored: ``"float32"`` (the same figures on every CPU) or ``"bfloat16"``.
    timing_dtype
        Dtype of the timing table: ``"auto"`` (:func:`resolve_timing_dtype`), ``"bfloat16"`` or ``"float32"``.
    timing_rounds
        Interleaved rounds of timed prefills (each configuration once per round, after two warm-up calls).
    ablation
        Also evaluate the ablation runs: variant a (a trained FastV) at every rate, variant b and DiViCo with the
        KL mean at 11.1%.
    methods
        Registered methods run without a checkpoint at each rate (default FastV; any registered method but the
        trained DeCo and DiViCo, which always run from their checkpoints).
    resamples, confidence, seed
        Bootstrap resamples, interval coverage and seed (:mod:`divico_testbed.statistics`).
    vision_cache
        Encode each image once for all runs (:class:`divico_testbed.vision_cache.VisionFeatureCache`; the same
        answers, about a quarter faster), except for methods that hook into the vision tower.
    runs
        Only these runs (names as in :func:`demo_runs`, e.g. ``"divico-keep11.1"``; the baseline always runs first,
        as the fidelity reference), or None for all. Several processes with disjoint ``runs`` and the same
        ``out_dir`` score in parallel once the baseline is answered; a last call with all runs then resumes every
        answer and writes the complete tables.
    """

    out_dir: Path = Path("outputs/demo")
    assets_dir: Path | None = None
    data_dir: Path | None = None
    limit: int | None = 24
    test_groups: int = DEFAULT_TEST_GROUPS
    batch_size: int = 16
    score_dtype: str = "float32"
    timing_dtype: str = "auto"
    timing_rounds: int = 15
    ablation: bool = False
    methods: tuple[str, ...] = TRAINING_FREE_METHODS
    benchmarks: tuple[str, ...] = BENCHMARK_ORDER
    show_progress: bool = True
    threads: int | None = None
    resamples: int = 2000
    confidence: float = 0.95
    seed: int = 0
    runs: tuple[str, ...] | None = None
    vision_cache: bool = True

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or None (full split), got {self.limit}.")
        if self.test_groups < 1:
            raise ValueError(f"test_groups must be >= 1, got {self.test_groups}.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}.")
        if self.score_dtype not in SCORE_DTYPES:
            raise ValueError(f"score_dtype must be one of {list(SCORE_DTYPES)}, got {self.score_dtype!r}.")
        if self.timing_dtype not in TIMING_DTYPES:
            raise ValueError(f"timing_dtype must be one of {list(TIMING_DTYPES)}, got {self.timing_dtype!r}.")
        if self.timing_rounds < 4:
            raise ValueError(f"timing_rounds must be >= 4 (a median and quartiles), got {self.timing_rounds}.")
        if self.resamples < 1:
            raise ValueError(f"resamples must be >= 1, got {self.resamples}.")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}.")
        free = [m for m in available_methods() if m not in TRAINED_METHODS]
        wrong = [m for m in self.methods if m not in free]
        if wrong or not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods must be distinct registered methods run without a checkpoint, valid: {free}; "
                             f"got {list(self.methods)}.")
        unknown = sorted(set(self.benchmarks) - set(BENCHMARK_ORDER))
        if unknown:
            raise ValueError(f"Unknown benchmarks {unknown}; valid: {list(BENCHMARK_ORDER)}.")
        if self.runs is not None and (not self.runs or len(set(self.runs)) != len(self.runs)):
            raise ValueError(f"runs must be distinct run names or None (all), got {self.runs!r}.")


def select_runs(specs: Sequence[RunSpec], names: Sequence[str] | None) -> list[RunSpec]:
    """The baseline and the runs named in ``names`` (all of ``specs`` for None), in the order of ``specs``."""
    if names is None:
        return list(specs)
    valid = [spec.name for spec in specs]
    unknown = [name for name in names if name not in valid]
    if unknown:
        raise ValueError(f"Unknown runs {unknown}; valid with these options: {valid}.")
    return [spec for spec in specs if spec.name == UNCOMPRESSED_RUN or spec.name in names]


@dataclass
class RunSpec:
    """One row of the tables: a method at a keep ratio (``tag``) and how to build it."""

    name: str
    method: str
    tag: str | None
    keep_ratio: float | None
    checkpoint: str | None = None

    @property
    def label(self) -> str:
        return method_title(self.method) + ("" if self.tag is None else f" @{self.tag}")


def demo_runs(assets_dir: Path, ablation: bool = False,
              methods: Sequence[str] = TRAINING_FREE_METHODS) -> list[RunSpec]:
    """Baseline (always first: the other runs' fidelity is measured against it), then the training-free
    ``methods`` (default FastV), DeCo and DiViCo at each shipped rate (and the ablation runs if asked:
    :data:`EVERY_RATE_VARIANTS` at each rate, :data:`ABLATION_RATE_VARIANTS` at :data:`ABLATION_TAG`)."""
    runs = [RunSpec(UNCOMPRESSED_RUN, UNCOMPRESSED_RUN, None, None)]

    def trained(method: str, tag: str) -> RunSpec:
        name = f"{method}-{tag}"
        return RunSpec(name, method, tag, PAPER_KEEP_RATIOS[tag], str(assets_dir / "compressors" / name))

    for tag, ratio in PAPER_KEEP_RATIOS.items():
        for method in methods:
            runs.append(RunSpec(f"{method}-{tag}", method, tag, ratio))
        runs.extend(trained(method, tag) for method in TRAINED_METHODS)
        if ablation:
            runs.extend(trained(variant, tag) for variant in EVERY_RATE_VARIANTS)
            if tag == ABLATION_TAG:
                runs.extend(trained(variant, tag) for variant in ABLATION_RATE_VARIANTS)
    return runs


def comparison_pairs(runs: Sequence[RunSpec]) -> list[tuple[str, str]]:
    """``(run, reference run)`` for every method's paired difference from FastV and from DeCo at the same rate.

    FastV is compared with nobody (DeCo - FastV already gives that difference), DeCo with FastV, every other method
    with both; DiViCo also with the trained FastV (variant a, :data:`TRAINED_FASTV`) where that run is present.
    """
    by_tag: dict[str, dict[str, str]] = {}
    for spec in runs:
        if spec.tag is not None:
            by_tag.setdefault(spec.tag, {})[spec.method] = spec.name
    pairs = []
    for spec in runs:
        if spec.tag is None:
            continue
        for index, reference in enumerate(BASELINE_METHODS):
            if spec.method in BASELINE_METHODS[:index + 1] or reference not in by_tag[spec.tag]:
                continue
            pairs.append((spec.name, by_tag[spec.tag][reference]))
        if spec.method == PROPOSED_METHOD and TRAINED_FASTV in by_tag[spec.tag]:
            pairs.append((spec.name, by_tag[spec.tag][TRAINED_FASTV]))
    return pairs


def _prepare(base: nn.Module, spec: RunSpec, layer: int = 2) -> nn.Module:
    """A copy of ``base`` for one run: with its checkpoint, or (training-free) compressed with its method and
    keep ratio, or (the baseline, no keep ratio) as it is."""
    model = copy.deepcopy(base)
    if spec.checkpoint is not None:
        if not (Path(spec.checkpoint) / "config.json").is_file():
            raise FileNotFoundError(
                f"Missing trained checkpoint {spec.checkpoint}; run `divico retrain-default --export` first."
            )
        divico.load_compressor(model, spec.checkpoint)
    elif spec.keep_ratio is not None:
        divico.apply_compression(model, divico.CompressionConfig(spec.method, keep_ratio=spec.keep_ratio, layer=layer))
    return model.eval()


def assets_fingerprint(assets: Path) -> str:
    """Content hash of a checkpoint folder, so finished demo answers of other checkpoints are not reused."""
    digest = hashlib.sha256()
    for path in sorted(p for p in assets.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(assets)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def run_fingerprint(assets: Path, spec: RunSpec) -> str:
    """What one run's answers depend on: the base model (``stage2/`` and the image size the recipe records) and,
    for a trained run, its own checkpoint folder. Retraining one compressor then invalidates only that run's
    answers; the recipe's other settings (threads, step counts of stages already trained) invalidate none."""
    recipe = assets / "recipe.json"
    image_size = json.loads(recipe.read_text()).get("image_size", 168) if recipe.is_file() else 168
    base = f"{assets_fingerprint(assets / 'stage2')}-{image_size}"
    if spec.checkpoint is None:
        return base
    return base + "-" + assets_fingerprint(Path(spec.checkpoint))


def predictions_key(config: DemoConfig, assets_digest: str) -> str:
    """Short hash of everything an answer depends on (checkpoints, data format, dtype, slice, batch, budget):
    the predictions files of other settings are never reused."""
    settings = {"assets": assets_digest, "data_format": DATA_FORMAT, "score_dtype": config.score_dtype,
                "limit": config.limit, "batch_size": config.batch_size, "max_new_tokens": MAX_NEW_TOKENS,
                "first_token_top_k": FIRST_TOKEN_TOP_K}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------------


def interleaved_timings(calls: Mapping[str, Callable[[], Any]], rounds: int, warmup: int = 2,
                        seed: int = 0) -> dict[str, list[float]]:
    """Wall times of ``calls`` measured in interleaved rounds.

    Each call first runs ``warmup`` times untimed; then every round times each call once, in an order shuffled
    anew each round (``random.Random(seed)``), so drifts of a shared machine's speed fall on every call alike.

    Returns
    -------
    dict
        ``name -> [seconds of round 0, round 1, ...]``.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}.")
    for call in calls.values():
        for _ in range(warmup):
            call()
    order = list(calls)
    rng = random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name in order}
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            tic = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - tic)
    return times


def timing_summary(seconds: Sequence[float]) -> dict[str, float]:
    """Median and quartiles (``numpy.percentile``, linear) of measured seconds."""
    q1, median, q3 = np.percentile(np.asarray(seconds, dtype=np.float64), [25, 50, 75])
    return {"prefill_seconds": float(median), "prefill_q1_seconds": float(q1), "prefill_q3_seconds": float(q3),
            "prefill_iqr_seconds": float(q3 - q1), "timing_rounds": len(seconds)}


def _efficiency_inputs(processor: Any, data_dir: Path, dtype: torch.dtype) -> Any:
    record = load_eval_records(data_dir, EFFICIENCY_BENCHMARK, "test")[0]
    inputs = processor(images=[Image.open(data_dir / record["image"]).convert("RGB")],
                       text=[chat_prompt(processor, record)], return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs


def measure_efficiency(specs: Sequence[RunSpec], assets: Path, data_dir: Path, dtype_name: str, rounds: int,
                       seed: int = 0) -> dict[str, dict[str, Any]]:
    """FLOPs (analytic), peak memory and interleaved prefill timings of one prompt (batch 1) for every run.

    All runs' models are held at once (one copy of the base each) so that their timings can be interleaved.
    """
    dtype = _TORCH_DTYPES[dtype_name]
    base, processor = load_trained_default(assets, dtype=dtype)
    inputs = _efficiency_inputs(processor, data_dir, dtype)
    models = {spec.name: _prepare(base, spec) for spec in specs}
    del base
    visual = int((inputs["input_ids"] == models[specs[0].name].config.image_token_id).sum())
    first_visual = int((inputs["input_ids"][0] == models[specs[0].name].config.image_token_id).nonzero()[0])
    total = int(inputs["input_ids"].shape[1])
    shape = PromptShape(visual_tokens=visual, text_tokens=total - visual - first_visual, system_tokens=first_visual)

    def prefill_of(model: nn.Module) -> Callable[[], Any]:
        def prefill() -> Any:
            with torch.no_grad():
                return model(**inputs, use_cache=True, logits_to_keep=1)
        return prefill

    calls = {name: prefill_of(model) for name, model in models.items()}
    out: dict[str, dict[str, Any]] = {}
    for name, model in models.items():
        memory = measure_peak_memory(calls[name], model=model)  # also a prefill, so last_report is filled
        runtime = divico.get_runtime(model)
        flops = count_flops(model.config, shape, compression=None if runtime is None else runtime.config)
        report = divico.last_report(model) if runtime is not None else None
        out[name] = {"visual_tokens": visual,
                     "kept_tokens": visual if report is None else int(report.num_kept.sum()),
                     "flops": int(flops.total), "peak_memory_bytes": int(memory.peak_bytes),
                     "model_bytes": int(memory.model_bytes), "timing_dtype": dtype_name}
    for name, seconds in interleaved_timings(calls, rounds, seed=seed).items():
        out[name].update(timing_summary(seconds), prefill_all_seconds=seconds)
    return out


# --------------------------------------------------------------------------------------------------------------
# Scores, intervals, differences, fidelity
# --------------------------------------------------------------------------------------------------------------


def score_statistics(
    evaluations: Mapping[str, EvaluationResult], pairs: Sequence[tuple[str, str]], benchmarks: Sequence[str],
    resamples: int = 2000, confidence: float = 0.95, seed: int = 0,
) -> tuple[dict[str, dict[str, dict[str, Any]]], dict[str, dict[str, dict[str, Any]]]]:
    """Bootstrap intervals of every run's scores and paired intervals of the differences in ``pairs``.

    Every run of a benchmark is resampled with the same draws of its scoring groups (seed ``seed + position of the
    benchmark``), which makes the differences paired.

    Returns
    -------
    tuple
        ``intervals[run][benchmark]`` and ``differences["run - reference"][benchmark]``, each an
        :meth:`divico_testbed.statistics.Interval.to_dict`.
    """
    intervals: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in evaluations}
    differences: dict[str, dict[str, dict[str, Any]]] = {f"{a} - {b}": {} for a, b in pairs}
    for position, benchmark in enumerate(benchmarks):
        scores = {name: GroupedScore(benchmark, ev.records[benchmark], ev.predictions[benchmark])
                  for name, ev in evaluations.items()}
        keys = next(iter(scores.values())).group_keys
        if any(score.group_keys != keys for score in scores.values()):
            raise ValueError(f"runs answered different {benchmark} questions; a paired comparison needs the same ones")
        indices = resample_indices(len(keys), resamples, seed + position)
        resampled = {name: score.resampled(indices) for name, score in scores.items()}
        for name, score in scores.items():
            intervals[name][benchmark] = percentile_interval(resampled[name], score.value, confidence).to_dict()
        for a, b in pairs:
            differences[f"{a} - {b}"][benchmark] = percentile_interval(
                resampled[a] - resampled[b], scores[a].value - scores[b].value, confidence).to_dict()
    return intervals, differences


def fidelity(evaluation: EvaluationResult, uncompressed: EvaluationResult) -> dict[str, Any]:
    """Label-free closeness of a run to the uncompressed model, over every record and per benchmark.

    Returns
    -------
    dict
        ``agreement`` (% of answers equal to the uncompressed model's), ``first_token_kl`` (mean KL, nats) and
        ``benchmarks`` (the same two per benchmark).
    """
    per_benchmark = {}
    for benchmark, predictions in evaluation.predictions.items():
        kl = [evaluation.first_token_kl[key] for key in predictions]
        per_benchmark[benchmark] = {"agreement": answer_agreement(predictions, uncompressed.predictions[benchmark]),
                                    "first_token_kl": float(np.mean(kl))}
    return {"agreement": answer_agreement(evaluation.all_predictions(), uncompressed.all_predictions()),
            "first_token_kl": float(np.mean(list(evaluation.first_token_kl.values()))),
            "benchmarks": per_benchmark}


def evaluate_runs(config: DemoConfig, specs: Sequence[RunSpec], assets: Path, data_dir: Path,
                  out: Path) -> dict[str, EvaluationResult]:
    """Answer and score every run in ``config.score_dtype`` (resumably), the uncompressed run first."""
    if specs[0].name != UNCOMPRESSED_RUN:
        raise ValueError(f"the first run must be {UNCOMPRESSED_RUN!r} (the fidelity reference), got {specs[0].name!r}")
    base, processor = load_trained_default(assets, dtype=_TORCH_DTYPES[config.score_dtype])
    vision_cache = VisionFeatureCache() if config.vision_cache else None
    evaluations: dict[str, EvaluationResult] = {}
    for spec in specs:
        uncompressed = spec.name == UNCOMPRESSED_RUN
        model = _prepare(base, spec)
        if vision_cache is not None:
            vision_cache.attach(model)  # not where a method hooks into the tower (VisionZip)
        key = predictions_key(config, run_fingerprint(assets, spec))
        tic = time.perf_counter()
        evaluation = evaluate_benchmarks(
            model, processor, data_dir, config.benchmarks, split="test", limit=config.limit,
            batch_size=config.batch_size, max_new_tokens=MAX_NEW_TOKENS, show_progress=config.show_progress,
            results_path=out / "predictions" / f"{spec.name}-{key}.jsonl",
            first_token_top_k=FIRST_TOKEN_TOP_K if uncompressed else 0,
            reference=None if uncompressed else evaluations[UNCOMPRESSED_RUN].first_token,
        )
        evaluations[spec.name] = evaluation
        print(f"[divico demo] {spec.label}: " + ", ".join(
            f"{BENCHMARK_TITLES[b]} {evaluation.scores[b]['score']:.1f}" for b in config.benchmarks)
            + f" ({time.perf_counter() - tic:.0f} s)", flush=True)
        del model
    return evaluations


def run_demo(config: DemoConfig) -> dict[str, dict[str, Any]]:
    """Evaluate every configuration (resuming answered records), then time them, and write tables and plot.

    Returns
    -------
    dict
        ``run name -> {"scores", "intervals", "differences", "fidelity", "details", "efficiency", ...}``.
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    assets = Path(config.assets_dir) if config.assets_dir is not None else ASSETS_DIR
    data_dir = Path(config.data_dir) if config.data_dir is not None else default_cache_root() / "demo-data"
    sizes = {"test": sizes_for_test_groups(config.test_groups)}
    if not benchmark_data_current(data_dir, sizes):
        write_benchmark_splits(data_dir, seed=0, sizes=sizes, show_progress=config.show_progress)
    specs = select_runs(demo_runs(assets, config.ablation, config.methods), config.runs)
    evaluations = evaluate_runs(config, specs, assets, data_dir, out)
    pairs = comparison_pairs(specs)
    intervals, differences = score_statistics(evaluations, pairs, config.benchmarks, config.resamples,
                                              config.confidence, config.seed)
    timing_dtype = resolve_timing_dtype(config.timing_dtype)
    efficiency = measure_efficiency(specs, assets, data_dir, timing_dtype, config.timing_rounds, config.seed)
    results: dict[str, dict[str, Any]] = {}
    for spec in specs:
        evaluation = evaluations[spec.name]
        results[spec.name] = {
            "name": spec.name, "method": spec.method, "tag": spec.tag, "keep_ratio": spec.keep_ratio,
            "scores": {b: float(s["score"]) for b, s in evaluation.scores.items()},
            "intervals": intervals[spec.name],
            "differences": {reference: differences[f"{spec.name} - {reference}"]
                            for name, reference in pairs if name == spec.name},
            "fidelity": None if spec.name == UNCOMPRESSED_RUN else fidelity(evaluation, evaluations[UNCOMPRESSED_RUN]),
            "details": evaluation.scores, "efficiency": efficiency[spec.name],
        }
    chance = {b: s["score"] for b, s in best_constant_scores(data_dir, config.benchmarks, "test", config.limit).items()}
    groups = {b: len({scoring_group_key(r) for r in evaluations[UNCOMPRESSED_RUN].records[b]})
              for b in config.benchmarks}
    heading = (f"Test {'splits' if config.limit is None else 'slices'}: "
               + ", ".join(f"{BENCHMARK_TITLES[b]} {groups[b]}" for b in config.benchmarks)
               + f" scoring groups; answers in {config.score_dtype}; [low, high] = {100 * config.confidence:g}% "
               f"bootstrap interval ({config.resamples} resamples of the scoring groups, seed {config.seed}).")
    tables = [
        heading, format_table1(results, config.benchmarks, chance),
        "Paired differences (same questions resampled for both; * = the interval excludes 0):",
        format_differences(results, config.benchmarks),
        "Fidelity to the uncompressed model (no labels needed):", format_fidelity(results),
        f"Efficiency: one {BENCHMARK_TITLES[EFFICIENCY_BENCHMARK]} test prompt, batch 1, {timing_dtype} (CPU native "
        f"bf16: {cpu_supports_native_bf16()}); prefill = median [IQR] of {config.timing_rounds} interleaved rounds.",
        format_table3(results),
    ]
    text = "\n\n".join(tables)
    print("\n" + text)
    (out / "tables.md").write_text(text + "\n")
    settings = {"limit": config.limit, "test_groups": config.test_groups, "score_dtype": config.score_dtype,
                "timing_dtype": timing_dtype, "timing_rounds": config.timing_rounds, "resamples": config.resamples,
                "confidence": config.confidence, "seed": config.seed, "benchmarks": list(config.benchmarks),
                "assets": assets_fingerprint(assets), "data_format": DATA_FORMAT, "scoring_groups": groups}
    (out / "results.json").write_text(json.dumps({"settings": settings, "runs": results,
                                                  "best_constant_answer": chance}, indent=2))
    plot_path = plot_results(results, config.benchmarks, out / "demo.png")
    print(f"\nwrote {out / 'tables.md'}, {out / 'results.json'} and {plot_path} "
          f"({time.perf_counter() - started:.0f} s)")
    return results


# --------------------------------------------------------------------------------------------------------------
# Tables and plot
# --------------------------------------------------------------------------------------------------------------


def relative_improvement(ours: float, best_baseline: float) -> float:
    """(ours - best) / |best| in percent (the paper's "Improvement" row); 0 when best is 0."""
    return 0.0 if best_baseline == 0 else 100.0 * (ours - best_baseline) / abs(best_baseline)


def _rate(tag: str) -> str:
    return f"{100 - float(tag.removeprefix('keep')):.1f}%"


def _tags(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    return sorted({r["tag"] for r in results.values() if r["tag"]}, key=lambda t: -float(t.removeprefix("keep")))


def _with_interval(value: float, interval: Mapping[str, Any] | None, signed: bool = False) -> str:
    text = f"{value:+.1f}" if signed else f"{value:.1f}"
    if interval is None:
        return text
    low, high = (f"{interval[k]:+.1f}" if signed else f"{interval[k]:.1f}" for k in ("low", "high"))
    return f"{text} [{low}, {high}]"


def format_table1(
    results: Mapping[str, Mapping[str, Any]], benchmarks: tuple[str, ...] = BENCHMARK_ORDER,
    chance: Mapping[str, float] | None = None,
) -> str:
    """Markdown Table I: scores per benchmark (with their intervals where a row has ``intervals``) and DiViCo's
    relative improvement over the best baseline.

    ``chance`` (benchmark -> best constant-answer score) adds a first reference row.
    """
    header = "| Rate | Method | " + " | ".join(BENCHMARK_TITLES[b] + ("" if b == "mme" else " (%)") for b in benchmarks)
    lines = [header + " |", "|" + "---|" * (len(benchmarks) + 2)]

    def row(rate: str, title: str, result: Mapping[str, Any]) -> str:
        intervals = result.get("intervals") or {}
        return f"| {rate} | {title} | " + " | ".join(
            _with_interval(result["scores"][b], intervals.get(b)) for b in benchmarks) + " |"

    if chance is not None:
        lines.append(row("-", "Best constant answer", {"scores": chance}))
    baseline = results.get(UNCOMPRESSED_RUN)
    if baseline is not None:
        lines.append(row("-", method_title(UNCOMPRESSED_RUN), baseline))
    for tag in _tags(results):
        rows = {r["method"]: r for r in results.values() if r["tag"] == tag}
        named = (*BASELINE_METHODS, PROPOSED_METHOD, *ABLATION_VARIANTS)
        others = tuple(m for m in rows if m not in named)  # further training-free methods (--methods), in run order
        for method in (*BASELINE_METHODS, PROPOSED_METHOD, *others, *ABLATION_VARIANTS):
            if method in rows:
                lines.append(row(_rate(tag), method_title(method), rows[method]))
        if all(m in rows for m in (*BASELINE_METHODS, PROPOSED_METHOD)):
            improvement = {
                b: relative_improvement(rows[PROPOSED_METHOD]["scores"][b],
                                        max(rows[m]["scores"][b] for m in BASELINE_METHODS))
                for b in benchmarks
            }
            lines.append(f"| {_rate(tag)} | Improvement | " + " | ".join(f"{improvement[b]:+.1f}%" for b in benchmarks) + " |")
    return "\n".join(lines)


def format_differences(results: Mapping[str, Mapping[str, Any]], benchmarks: tuple[str, ...] = BENCHMARK_ORDER) -> str:
    """Markdown table of the paired differences (points; MME in its own points), ``*`` where 0 is outside.

    ``results`` is keyed by run name; a row's ``differences`` maps a reference run's name to per-benchmark intervals.
    """
    lines = ["| Rate | Difference | " + " | ".join(BENCHMARK_TITLES[b] for b in benchmarks) + " |",
             "|" + "---|" * (len(benchmarks) + 2)]
    for tag in _tags(results):
        for result in (r for r in results.values() if r["tag"] == tag):
            for reference, per_benchmark in result.get("differences", {}).items():
                cells = []
                for b in benchmarks:
                    interval = per_benchmark[b]
                    low, high = interval["low"], interval["high"]
                    mark = " *" if low > 0 or high < 0 else ""
                    cells.append(_with_interval(interval["estimate"], interval, signed=True) + mark)
                title = f"{method_title(result['method'])} - {method_title(results[reference]['method'])}"
                lines.append(f"| {_rate(tag)} | {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_fidelity(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table: share of answers equal to the uncompressed model's and the mean first-token KL."""
    lines = ["| Rate | Method | Same answer as uncompressed (%) | First-token KL to uncompressed (nats) |",
             "|---|---|---|---|"]
    for tag in _tags(results):
        for result in (r for r in results.values() if r["tag"] == tag and r.get("fidelity")):
            fid = result["fidelity"]
            lines.append(f"| {_rate(tag)} | {method_title(result['method'])} | {fid['agreement']:.1f} | "
                         f"{fid['first_token_kl']:.3f} |")
    return "\n".join(lines)


def format_table3(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown Table III: accuracy (VQAv2), FLOPs, peak memory above the weights, prefill time (batch 1, median and
    interquartile range where measured), with ratios to the baseline."""
    baseline = results.get(UNCOMPRESSED_RUN)
    lines = ["| Model | Visual tokens | Accuracy (%) | FLOPs (G) | Peak activation memory (MB) | Prefill (ms) | "
             "Prefill IQR (ms) |", "|---|---|---|---|---|---|---|"]
    for r in results.values():
        e = r["efficiency"]
        accuracy = r["scores"].get(EFFICIENCY_BENCHMARK, float("nan"))
        title = (method_title(r["method"]) if r["tag"] is None
                 else f"{method_title(r['method'])} @{_rate(r['tag'])} compr.")
        spread = (f"{1000 * e['prefill_q1_seconds']:.0f}-{1000 * e['prefill_q3_seconds']:.0f}"
                  if "prefill_q1_seconds" in e else "-")
        lines.append(f"| {title} | {e['kept_tokens']}/{e['visual_tokens']} | {accuracy:.1f} | {e['flops'] / 1e9:.1f} | "
                     f"{e['peak_memory_bytes'] / 2**20:.0f} | {1000 * e['prefill_seconds']:.0f} | {spread} |")
        if baseline is not None and r is not baseline:
            b = baseline["efficiency"]
            lines.append(
                f"| Δ ratio | | {_ratio(accuracy, baseline['scores'].get(EFFICIENCY_BENCHMARK, float('nan')))} | "
                f"{_ratio(e['flops'], b['flops'])} | {_ratio(e['peak_memory_bytes'], b['peak_memory_bytes'])} | "
                f"{_ratio(e['prefill_seconds'], b['prefill_seconds'])} | |"
            )
    return "\n".join(lines)


def _ratio(value: float, reference: float) -> str:
    if not reference or reference != reference:
        return "-"
    change = 100.0 * (value - reference) / reference
    return f"{change:+.1f}%"


def plot_results(results: Mapping[str, Mapping[str, Any]], benchmarks: tuple[str, ...], path: Path) -> Path:
    """Score (mean of per-benchmark scores relative to the baseline) and prefill latency (median, IQR as error
    bars and as the baseline's band) vs. visual tokens kept."""
    baseline = results[UNCOMPRESSED_RUN]
    fig = Figure(figsize=(11, 4.2))  # no pyplot: nothing depends on the GUI backend, nothing is left open
    ax_score, ax_time = fig.subplots(1, 2)
    plotted = (*BASELINE_METHODS, PROPOSED_METHOD, TRAINED_FASTV)
    others = list(dict.fromkeys(r["method"] for r in results.values() if r["tag"] and r["method"] not in plotted
                                and r["method"] not in ABLATION_VARIANTS))
    for method, marker in zip((*plotted, *others), "osD^vP*Xhp<>" * 2):
        rows = sorted((r for r in results.values() if r["method"] == method), key=lambda r: r["efficiency"]["kept_tokens"])
        if not rows:
            continue
        kept = [r["efficiency"]["kept_tokens"] for r in rows]
        relative = [
            100.0 * sum(r["scores"][b] / baseline["scores"][b] for b in benchmarks if baseline["scores"][b])
            / max(1, sum(1 for b in benchmarks if baseline["scores"][b]))
            for r in rows
        ]
        ax_score.plot(kept, relative, marker=marker, label=method_title(method))
        median = np.array([1000 * r["efficiency"]["prefill_seconds"] for r in rows])
        low = np.array([1000 * r["efficiency"].get("prefill_q1_seconds", r["efficiency"]["prefill_seconds"])
                        for r in rows])
        high = np.array([1000 * r["efficiency"].get("prefill_q3_seconds", r["efficiency"]["prefill_seconds"])
                         for r in rows])
        ax_time.errorbar(kept, median, yerr=[median - low, high - median], marker=marker, capsize=3,
                         label=method_title(method))
    full = baseline["efficiency"]["visual_tokens"]
    ax_score.axhline(100, color="red", linestyle="--", label=f"Baseline ({full} tokens)")
    base_eff = baseline["efficiency"]
    ax_time.axhline(1000 * base_eff["prefill_seconds"], color="red", linestyle="--", label=f"Baseline ({full} tokens)")
    if "prefill_q1_seconds" in base_eff:
        ax_time.axhspan(1000 * base_eff["prefill_q1_seconds"], 1000 * base_eff["prefill_q3_seconds"], color="red",
                        alpha=0.12)
    rounds = base_eff.get("timing_rounds")
    dtype = base_eff.get("timing_dtype", "")
    ax_score.set(xlabel="visual tokens kept", ylabel="score relative to baseline (%)",
                 title="Accuracy kept (mean over benchmarks)")
    ax_time.set(xlabel="visual tokens kept", ylabel="prefill latency (ms, batch 1)",
                title=f"Prefill latency ({dtype})\nmedian and IQR of {rounds} interleaved rounds" if rounds
                else "Prefill latency")
    for ax in (ax_score, ax_time):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
