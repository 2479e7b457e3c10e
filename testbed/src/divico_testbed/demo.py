"""`divico demo`: accuracy kept vs. speed gained on the trained default model (the paper's Tables I and III).

Evaluates the uncompressed base model, FastV (training-free), DeCo and DiViCo (trained checkpoints shipped in
``divico_testbed/assets/default``) at the paper's three rates on held-out test slices of the mini-benchmarks, measures
FLOPs (analytic), peak memory and prefill latency for each, prints both tables and writes a plot. Results are
appended to ``<out>/results.jsonl`` as each configuration finishes, so an interrupted demo resumes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import divico
import torch
from divico.efficiency import PromptShape, count_flops, measure_peak_memory, time_call
from divico.registry import get_method_class
from matplotlib.figure import Figure
from PIL import Image
from torch import nn

from divico_testbed.data import DATA_FORMAT, benchmark_data_current, load_eval_records, write_benchmark_splits
from divico_testbed.default_model import default_cache_root
from divico_testbed.evaluation import best_constant_scores, chat_prompt, evaluate_benchmarks
from divico_testbed.recipe import ABLATION_TAG, ASSETS_DIR, PAPER_KEEP_RATIOS, load_trained_default

BENCHMARK_ORDER = ("textvqa", "pope", "mmbench", "mme", "gqa")
BENCHMARK_TITLES = {"textvqa": "TextVQA", "pope": "POPE", "mmbench": "MMBench", "mme": "MME", "gqa": "GQA"}
#: The paper's comparison: DiViCo against the best of the two baselines at each rate.
BASELINE_METHODS = ("fastv", "deco")
PROPOSED_METHOD = "divico"
#: Registered methods the demo runs without a checkpoint (training-free) and with a shipped one.
TRAINING_FREE_METHODS = ("fastv",)
TRAINED_METHODS = ("deco", "divico")
#: The demo's own run names, which are no registered method: the uncompressed model and the Fig. 8 ablation
#: variants (a: FastV + LoRA, b: DiViCo with a deterministic encoder), each a trained checkpoint.
RUN_TITLES = {"baseline": "Baseline", "variant_a": "w/o DC (a)", "variant_b": "w/o DE (b)"}
ABLATION_VARIANTS = ("variant_a", "variant_b")


def method_title(method: str) -> str:
    """Display name of a table row's method: the demo's own run names, else the registered method's title."""
    return RUN_TITLES[method] if method in RUN_TITLES else get_method_class(method).title()


@dataclass
class DemoConfig:
    """What the demo runs.

    Attributes
    ----------
    out_dir
        Where results.jsonl, tables.md, results.json and demo.png go.
    assets_dir
        Trained checkpoints (default: the ones shipped in the package).
    data_dir
        Mini-benchmark data (generated with seed 0 if missing; default ``<cache>/demo-data``).
    limit
        Scoring groups per benchmark (a question; an MMBench circular group; an MME image pair); None = full split.
    batch_size
        Generation batch size.
    dtype
        ``"bfloat16"`` (fast on CPUs with AMX) or ``"float32"``.
    repeats
        Timed prefill repeats per configuration (after one warm-up).
    ablation
        Also evaluate the Fig. 8 variants a/b at 11.1%.
    """

    out_dir: Path = Path("outputs/demo")
    assets_dir: Path | None = None
    data_dir: Path | None = None
    limit: int | None = 24
    batch_size: int = 16
    dtype: str = "bfloat16"
    repeats: int = 3
    ablation: bool = False
    benchmarks: tuple[str, ...] = BENCHMARK_ORDER
    show_progress: bool = True
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or None (full split), got {self.limit}.")
        if self.dtype not in ("bfloat16", "float32"):
            raise ValueError(f"dtype must be 'bfloat16' or 'float32', got {self.dtype!r}.")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}.")
        unknown = sorted(set(self.benchmarks) - set(BENCHMARK_ORDER))
        if unknown:
            raise ValueError(f"Unknown benchmarks {unknown}; valid: {list(BENCHMARK_ORDER)}.")


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


def demo_runs(assets_dir: Path, ablation: bool = False) -> list[RunSpec]:
    """Baseline, then FastV / DeCo / DiViCo at each shipped rate (and the ablation variants if asked)."""
    runs = [RunSpec("baseline", "baseline", None, None)]
    for tag, ratio in PAPER_KEEP_RATIOS.items():
        for method in TRAINING_FREE_METHODS:
            runs.append(RunSpec(f"{method}-{tag}", method, tag, ratio))
        for method in TRAINED_METHODS:
            runs.append(RunSpec(f"{method}-{tag}", method, tag, ratio, str(assets_dir / "compressors" / f"{method}-{tag}")))
    if ablation:
        for variant in ABLATION_VARIANTS:
            name = f"{variant}-{ABLATION_TAG}"
            runs.append(RunSpec(name, variant, ABLATION_TAG, PAPER_KEEP_RATIOS[ABLATION_TAG],
                                str(assets_dir / "compressors" / name)))
    return runs


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


def _efficiency(model: nn.Module, processor: Any, spec: RunSpec, data_dir: Path, repeats: int) -> dict[str, Any]:
    """Analytic FLOPs, peak memory and prefill latency of one representative prompt (batch 1)."""
    record = load_eval_records(data_dir, "textvqa", "test")[0]
    inputs = processor(images=[Image.open(data_dir / record["image"]).convert("RGB")],
                       text=[chat_prompt(processor, record)], return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(next(model.parameters()).dtype)
    visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    first_visual = int((inputs["input_ids"][0] == model.config.image_token_id).nonzero()[0])
    total = int(inputs["input_ids"].shape[1])

    def prefill() -> Any:
        with torch.no_grad():
            return model(**inputs, use_cache=True, logits_to_keep=1)

    timing = time_call(prefill, repeats=repeats, warmup=1)
    memory = measure_peak_memory(prefill, model=model)
    runtime = divico.get_runtime(model)
    shape = PromptShape(visual_tokens=visual, text_tokens=total - visual - first_visual, system_tokens=first_visual)
    flops = count_flops(model.config, shape, compression=None if runtime is None else runtime.config)
    report = divico.last_report(model) if runtime is not None else None
    return {
        "visual_tokens": visual,
        "kept_tokens": visual if report is None else int(report.num_kept.sum()),
        "flops": int(flops.total),
        "peak_memory_bytes": int(memory.peak_bytes),
        "model_bytes": int(memory.model_bytes),
        "prefill_seconds": float(timing.median),
        "prefill_iqr_seconds": float(timing.iqr),
    }


def assets_fingerprint(assets: Path) -> str:
    """Content hash of a checkpoint folder, so finished demo rows of other checkpoints are not reused."""
    digest = hashlib.sha256()
    for path in sorted(p for p in assets.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(assets)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _read_results(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {row["name"]: row for row in rows}


def run_demo(config: DemoConfig) -> dict[str, dict[str, Any]]:
    """Evaluate every configuration (resuming finished ones) and write tables and plot.

    Returns
    -------
    dict
        ``run name -> {"scores": {benchmark: score}, "efficiency": {...}, ...}``.
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    assets = Path(config.assets_dir) if config.assets_dir is not None else ASSETS_DIR
    data_dir = Path(config.data_dir) if config.data_dir is not None else default_cache_root() / "demo-data"
    if not benchmark_data_current(data_dir):
        write_benchmark_splits(data_dir, seed=0, show_progress=config.show_progress)
    dtype = torch.bfloat16 if config.dtype == "bfloat16" else torch.float32
    base, processor = load_trained_default(assets, dtype=dtype)
    results_path = out / "results.jsonl"
    results = _read_results(results_path)
    settings = {"limit": config.limit, "dtype": config.dtype, "benchmarks": list(config.benchmarks),
                "assets": assets_fingerprint(assets), "data_format": DATA_FORMAT}
    for spec in demo_runs(assets, config.ablation):
        if spec.name in results and results[spec.name].get("settings") == settings:
            continue
        model = _prepare(base, spec)
        tic = time.perf_counter()
        scores = evaluate_benchmarks(
            model, processor, data_dir, config.benchmarks, split="test", limit=config.limit,
            batch_size=config.batch_size, max_new_tokens=8, show_progress=config.show_progress,
            results_path=out / "predictions" / f"{spec.name}-{config.dtype}-{config.limit}.jsonl",
        )
        row = {
            "name": spec.name, "method": spec.method, "tag": spec.tag, "keep_ratio": spec.keep_ratio,
            "settings": settings, "scores": {b: s["score"] for b, s in scores.items()},
            "details": scores, "eval_seconds": time.perf_counter() - tic,
            "efficiency": _efficiency(model, processor, spec, data_dir, config.repeats),
        }
        with results_path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        results[spec.name] = row
        print(f"[divico demo] {spec.label}: " + ", ".join(
            f"{BENCHMARK_TITLES[b]} {row['scores'][b]:.1f}" for b in config.benchmarks), flush=True)
        del model
    ordered = {spec.name: results[spec.name] for spec in demo_runs(assets, config.ablation)}
    chance = {b: s["score"] for b, s in best_constant_scores(data_dir, config.benchmarks, "test", config.limit).items()}
    table1 = format_table1(ordered, config.benchmarks, chance)
    table3 = format_table3(ordered)
    print("\n" + table1 + "\n\n" + table3)
    (out / "tables.md").write_text(table1 + "\n\n" + table3 + "\n")
    (out / "results.json").write_text(json.dumps({"runs": ordered, "best_constant_answer": chance}, indent=2))
    plot_path = plot_results(ordered, config.benchmarks, out / "demo.png")
    print(f"\nwrote {out / 'tables.md'}, {out / 'results.json'} and {plot_path} "
          f"({time.perf_counter() - started:.0f} s)")
    return ordered


def relative_improvement(ours: float, best_baseline: float) -> float:
    """(ours - best) / |best| in percent (the paper's "Improvement" row); 0 when best is 0."""
    return 0.0 if best_baseline == 0 else 100.0 * (ours - best_baseline) / abs(best_baseline)


def format_table1(
    results: dict[str, dict[str, Any]], benchmarks: tuple[str, ...] = BENCHMARK_ORDER,
    chance: dict[str, float] | None = None,
) -> str:
    """Markdown Table I: scores per benchmark and DiViCo's relative improvement over the best baseline.

    ``chance`` (benchmark -> best constant-answer score) adds a first reference row.
    """
    header = "| Rate | Method | " + " | ".join(BENCHMARK_TITLES[b] + ("" if b == "mme" else " (%)") for b in benchmarks)
    lines = [header + " |", "|" + "---|" * (len(benchmarks) + 2)]

    def row(rate: str, title: str, scores: dict[str, float]) -> str:
        return f"| {rate} | {title} | " + " | ".join(f"{scores[b]:.1f}" for b in benchmarks) + " |"

    if chance is not None:
        lines.append(row("-", "Best constant answer", chance))
    baseline = results.get("baseline")
    if baseline is not None:
        lines.append(row("-", "Baseline", baseline["scores"]))
    tags = sorted({r["tag"] for r in results.values() if r["tag"]}, key=lambda t: -float(t.removeprefix("keep")))
    for tag in tags:
        rate = f"{100 - float(tag.removeprefix('keep')):.1f}%"
        rows = {r["method"]: r for r in results.values() if r["tag"] == tag}
        for method in (*BASELINE_METHODS, PROPOSED_METHOD, *ABLATION_VARIANTS):
            if method in rows:
                lines.append(row(rate, method_title(method), rows[method]["scores"]))
        if all(m in rows for m in (*BASELINE_METHODS, PROPOSED_METHOD)):
            improvement = {
                b: relative_improvement(rows[PROPOSED_METHOD]["scores"][b],
                                        max(rows[m]["scores"][b] for m in BASELINE_METHODS))
                for b in benchmarks
            }
            lines.append(f"| {rate} | Improvement | " + " | ".join(f"{improvement[b]:+.1f}%" for b in benchmarks) + " |")
    return "\n".join(lines)


def format_table3(results: dict[str, dict[str, Any]]) -> str:
    """Markdown Table III: accuracy (TextVQA), FLOPs, peak memory above the weights, prefill time (batch 1),
    with ratios to the baseline."""
    baseline = results.get("baseline")
    lines = ["| Model | Visual tokens | Accuracy (%) | FLOPs (G) | Peak activation memory (MB) | Prefill (ms) |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        e = r["efficiency"]
        accuracy = r["scores"].get("textvqa", float("nan"))
        title = (method_title(r["method"]) if r["tag"] is None
                 else f"{method_title(r['method'])} @{100 - float(r['tag'].removeprefix('keep')):.1f}% compr.")
        lines.append(f"| {title} | {e['kept_tokens']}/{e['visual_tokens']} | {accuracy:.1f} | {e['flops'] / 1e9:.1f} | "
                     f"{e['peak_memory_bytes'] / 2**20:.0f} | {1000 * e['prefill_seconds']:.0f} |")
        if baseline is not None and r is not baseline:
            b = baseline["efficiency"]
            lines.append(
                f"| Δ ratio | | {_ratio(accuracy, baseline['scores'].get('textvqa', float('nan')))} | "
                f"{_ratio(e['flops'], b['flops'])} | {_ratio(e['peak_memory_bytes'], b['peak_memory_bytes'])} | "
                f"{_ratio(e['prefill_seconds'], b['prefill_seconds'])} |"
            )
    return "\n".join(lines)


def _ratio(value: float, reference: float) -> str:
    if not reference or reference != reference:
        return "-"
    change = 100.0 * (value - reference) / reference
    return f"{change:+.1f}%"


def plot_results(results: dict[str, dict[str, Any]], benchmarks: tuple[str, ...], path: Path) -> Path:
    """Score (mean of per-benchmark scores relative to the baseline) and prefill latency vs. visual tokens kept."""
    baseline = results["baseline"]
    fig = Figure(figsize=(11, 4.2))  # no pyplot: nothing depends on the GUI backend, nothing is left open
    ax_score, ax_time = fig.subplots(1, 2)
    for method, marker in zip((*BASELINE_METHODS, PROPOSED_METHOD), "osD", strict=True):
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
        ax_time.plot(kept, [1000 * r["efficiency"]["prefill_seconds"] for r in rows], marker=marker,
                     label=method_title(method))
    full = baseline["efficiency"]["visual_tokens"]
    ax_score.axhline(100, color="red", linestyle="--", label=f"Baseline ({full} tokens)")
    ax_time.axhline(1000 * baseline["efficiency"]["prefill_seconds"], color="red", linestyle="--",
                    label=f"Baseline ({full} tokens)")
    ax_score.set(xlabel="visual tokens kept", ylabel="score relative to baseline (%)",
                 title="Accuracy kept (mean over benchmarks)")
    ax_time.set(xlabel="visual tokens kept", ylabel="prefill latency (ms, batch 1)", title="Prefill latency")
    for ax in (ax_score, ax_time):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


SLICE_RUNS = ("baseline", "fastv-keep11.1", "divico-keep11.1", "deco-keep11.1")


def demo_slice(
    assets_dir: Path | None = None, data_dir: Path | None = None, limit: int = 3, runs: tuple[str, ...] = SLICE_RUNS,
    show_progress: bool = False,
) -> dict[str, Any]:
    """A small, deterministic slice of the demo (float32, the first ``limit`` groups of every benchmark).

    ``docs/demo_slice.json`` holds its output for the shipped checkpoints; a test re-runs it and checks that
    the figures agree.
    """
    assets = Path(assets_dir) if assets_dir is not None else ASSETS_DIR
    data = Path(data_dir) if data_dir is not None else default_cache_root() / "demo-data"
    if not benchmark_data_current(data):
        write_benchmark_splits(data, seed=0, show_progress=show_progress)
    base, processor = load_trained_default(assets, dtype=torch.float32)
    specs = {spec.name: spec for spec in demo_runs(assets)}
    out: dict[str, Any] = {"limit": limit, "dtype": "float32", "runs": {}}
    for name in runs:
        if name not in specs:
            raise ValueError(f"Unknown demo run {name!r}; valid: {sorted(specs)}.")
        model = _prepare(base, specs[name])
        scores = evaluate_benchmarks(model, processor, data, BENCHMARK_ORDER, split="test", limit=limit,
                                     batch_size=8, max_new_tokens=8, show_progress=show_progress)
        out["runs"][name] = {b: round(float(s["score"]), 4) for b, s in scores.items()}
        del model
    return out
