"""Run a model on a benchmark: predictions appended as they are produced, resume, data-parallel shards, scores,
latency, and the comparison of several compression configurations in one model load.

Files, per benchmark (``OUT/<benchmark>/``; in compare mode ``OUT/<configuration>/<benchmark>/``):

``predictions.jsonl``
    One JSON object per answered question, in benchmark order once the run has finished: ``question_id``,
    ``prediction`` (the raw model output), and for debugging ``prompt``, ``images``, ``video``, ``reference``,
    ``meta``. While the run goes, each answer is appended (flushed) as soon as its batch is generated.
``predictions.rank<r>.jsonl``
    Under ``accelerate launch`` with several processes, process r appends here; the main process merges the shards
    into ``predictions.jsonl`` (benchmark order) and deletes them.
``run_config.json``
    What the predictions depend on (model, compression, compressor, dtype, benchmark split and options, the
    generation budget). A rerun with another configuration into the same folder is refused instead of mixing
    answers of two models.
``scores.json``
    ``scores`` (the benchmark's official scoring), ``timings`` (prefill / decode latency, throughput),
    ``visual_tokens`` (kept / total, when compressed), ``config`` (run_config + limit, batch size, processes).

Resume: a rerun reads every predictions file of the folder and answers only the questions without a prediction;
a torn last line (the process was killed while writing it) is dropped and that question answered again.

Data parallel: process r of W answers the selected samples i with ``i % W == r``. The merged file holds the same
lines, in the same order, as a single-process run (identical bytes when the generated answers are identical; on CPU
with a batch size of 1 they are).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from PIL import Image
from tqdm.auto import tqdm

from divico.api import apply_compression, get_runtime, remove_compression, unwrap_model
from divico.checkpoint import load_compressor, read_saved_config, saved_compression_config
from divico.config import CompressionConfig
from divico.evaluation.benchmark import Benchmark, Sample
from divico.evaluation.generation import GenerationTimings, generate_batch
from divico.lora import has_lora, unload_lora
from divico.perturbation import NoiseConfig, add_noise
from divico.registry import available_methods, get_adapter, get_method_class
from divico.video import read_video_frames

__all__ = [
    "BASELINE",
    "EvalConfiguration",
    "compare_configurations",
    "configured",
    "evaluate_benchmark",
    "format_comparison_table",
    "process_state",
    "read_predictions",
]

PREDICTIONS_NAME = "predictions.jsonl"
SCORES_NAME = "scores.json"
RUN_CONFIG_NAME = "run_config.json"
TABLE_NAME = "table.md"
#: The name of the uncompressed configuration in compare mode.
BASELINE = "baseline"
#: Frames sampled from a video sample (Video-LLaVA's evaluation uses 8).
DEFAULT_NUM_FRAMES = 8


def process_state() -> PartialState:
    """accelerate's process state; on a machine without CUDA (or with ``ACCELERATE_USE_CPU``) several launched
    processes form a gloo (CPU) group.

    Without ``cpu=True`` accelerate reads a torchrun launch on a CPU-only machine as one process per copy, so every
    copy would answer every question. (``accelerate launch --cpu`` starts a single process in accelerate 1.15;
    ``accelerate launch --multi_gpu --num_processes N`` or ``torchrun --nproc_per_node N`` start N.)
    """
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
    return PartialState(cpu=use_cpu or not torch.cuda.is_available())


# -- predictions files ----------------------------------------------------------------------------------------------

def read_predictions(path: Path) -> dict[str, str]:
    """``question_id -> raw JSON line`` of every complete line of a predictions file ({} if it does not exist).

    A last line without its newline is a write cut short by a kill: it is ignored (the question is answered
    again). Later lines win over earlier ones with the same ``question_id``.

    Raises
    ------
    ValueError
        If a complete line is not a JSON object with a ``question_id`` (the file is damaged, not just torn).
    """
    if not path.is_file():
        return {}
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")[:-1]  # the part after the last newline is empty or torn
    found: dict[str, str] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not a JSON object ({error.msg}); the predictions file is "
                             "damaged. Delete that line (its question is then answered again).") from None
        if not isinstance(record, dict) or "question_id" not in record:
            raise ValueError(f"{path}, line {number}: expected an object with 'question_id' and 'prediction'.")
        found[str(record["question_id"])] = line
    return found


def _drop_torn_tail(path: Path) -> None:
    """Cut a file back to its last newline, so the next append starts on a fresh line."""
    if not path.is_file():
        return
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end != len(data):
        with path.open("r+b") as handle:
            handle.truncate(end)


def _shard_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("predictions.rank*.jsonl"))


def _record_line(sample: Sample, prediction: str) -> str:
    record = {
        "question_id": sample.question_id,
        "prediction": prediction,
        "prompt": sample.prompt,
        "images": [str(path) for path in sample.images],
        "video": None if sample.video is None else str(sample.video),
        "reference": sample.reference,
        "meta": sample.meta,
    }
    return json.dumps(record, ensure_ascii=False, default=str)


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


# -- the run configuration ------------------------------------------------------------------------------------------

def _run_config(model: torch.nn.Module, benchmark: Benchmark, max_new_tokens: int | None,
                run_info: Mapping[str, Any] | None) -> dict[str, Any]:
    base = unwrap_model(model)
    runtime = get_runtime(base)
    parameter = next(base.parameters())
    return {
        "model": getattr(base.config, "_name_or_path", "") or type(base).__name__,
        "model_class": type(base).__name__,
        "dtype": str(parameter.dtype).removeprefix("torch."),
        "compression": None if runtime is None else runtime.config.to_dict(),
        "lora": has_lora(base),
        "benchmark": benchmark.name,
        "split": benchmark.split,
        "options": dict(benchmark.options),
        "max_new_tokens": max_new_tokens,
        **dict(run_info or {}),
    }


def _check_run_config(folder: Path, config: dict[str, Any]) -> None:
    path = folder / RUN_CONFIG_NAME
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    # Compare through JSON so tuples / paths read back the way they were written.
    current = json.loads(json.dumps(config, default=str))
    differences = sorted(key for key in set(saved) | set(current) if saved.get(key) != current.get(key))
    if differences:
        details = "; ".join(f"{key}: {saved.get(key)!r} then, {current.get(key)!r} now" for key in differences)
        raise ValueError(f"{folder} holds predictions of another configuration ({details}). Use another --out "
                         "folder, or delete that one to start afresh.")


# -- one benchmark --------------------------------------------------------------------------------------------------

def _batches(samples: Sequence[Sample], batch_size: int, budget: Mapping[str, int]) -> Iterator[list[Sample]]:
    """Consecutive samples with the same generation budget, at most ``batch_size`` at a time."""
    batch: list[Sample] = []
    for sample in samples:
        if batch and (len(batch) == batch_size or budget[sample.question_id] != budget[batch[0].question_id]):
            yield batch
            batch = []
        batch.append(sample)
    if batch:
        yield batch


def _load_images(sample: Sample) -> list[Image.Image]:
    images = []
    for path in sample.images:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images


def _video_frames(benchmark: Benchmark, sample: Sample, num_frames: int) -> np.ndarray | None:
    """(T, H, W, 3) uint8 frames of a video sample (the benchmark's own ``frames`` reader if it has one)."""
    if sample.video is None:
        return None
    reader = getattr(benchmark, "frames", None)
    if callable(reader):
        return reader(sample)
    return read_video_frames(sample.video, int(sample.meta.get("num_frames", num_frames)))


def evaluate_benchmark(
    model: torch.nn.Module,
    processor: Any,
    benchmark: Benchmark,
    out_dir: str | Path,
    *,
    limit: int | None = None,
    batch_size: int = 1,
    max_new_tokens: int | None = None,
    judge: Any = None,
    show_progress: bool = True,
    run_info: Mapping[str, Any] | None = None,
    num_frames: int = DEFAULT_NUM_FRAMES,
) -> dict[str, Any]:
    """Answer ``benchmark``'s questions with ``model``, append them to ``OUT/<benchmark>/predictions.jsonl`` and
    score them into ``OUT/<benchmark>/scores.json`` (see the module docstring for the files, resume and sharding).

    Parameters
    ----------
    model, processor
        A transformers LVLM (compressed with divico or not) and its processor; the model is used as it is.
    benchmark
        The benchmark instance (data root, split and options chosen).
    out_dir
        Output folder; the benchmark writes into ``out_dir / benchmark.name``.
    limit
        Answer only the first ``limit`` questions (benchmark order), >= 1; None: all.
    batch_size
        Questions per ``generate`` call, >= 1.
    max_new_tokens
        Generation budget; None: the benchmark's default. A sample's own ``max_new_tokens`` wins over both.
    judge
        Passed to ``benchmark.score`` (LLM judge of video QA).
    show_progress
        Show a progress bar (main process only).
    run_info
        Extra facts recorded in ``run_config.json`` / ``scores.json`` and checked on resume (e.g. the
        ``--model`` name given and the compressor folder).
    num_frames
        Frames sampled from each video sample, unless the benchmark has its own ``frames(sample)`` reader or the
        sample's ``meta["num_frames"]`` says otherwise.

    Returns
    -------
    dict
        The content of ``scores.json``: ``benchmark``, ``scores``, ``timings``, ``visual_tokens``, ``config``,
        ``submission`` (the file written where answers are not public, else None). Every process returns it.

    Raises
    ------
    ValueError
        ``limit`` < 1, ``batch_size`` < 1, ``max_new_tokens`` < 1, or a folder holding another configuration's
        predictions.
    """
    for name, value in (("limit", limit), ("max_new_tokens", max_new_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1 (or None), got {value!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    state = process_state()
    world, rank = state.num_processes, state.process_index
    all_samples = benchmark.load()
    samples = all_samples if limit is None else all_samples[:limit]
    folder = Path(out_dir) / benchmark.name
    folder.mkdir(parents=True, exist_ok=True)
    config = _run_config(model, benchmark, max_new_tokens, run_info)
    _check_run_config(folder, config)
    done: dict[str, str] = {}
    for path in [folder / PREDICTIONS_NAME, *_shard_files(folder)]:
        done.update(read_predictions(path))
    state.wait_for_everyone()  # every process has read the files before any writes
    if state.is_main_process:
        (folder / RUN_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    own_file = folder / (PREDICTIONS_NAME if world == 1 else f"predictions.rank{rank}.jsonl")
    _drop_torn_tail(own_file)

    default_budget = max_new_tokens if max_new_tokens is not None else benchmark.default_max_new_tokens
    budget = {s.question_id: s.max_new_tokens or default_budget for s in samples}
    todo = [s for index, s in enumerate(samples) if index % world == rank and s.question_id not in done]
    timings = GenerationTimings()
    visual = {"visual": 0, "kept": 0, "questions": 0}
    model.eval()
    progress = tqdm(total=len(todo), desc=benchmark.name, unit="q",
                    disable=not show_progress or not state.is_main_process)
    with own_file.open("a", encoding="utf-8") as handle:
        for batch in _batches(todo, batch_size, budget):
            videos = [_video_frames(benchmark, s, num_frames) for s in batch]
            answers = generate_batch(
                model, processor, [s.prompt for s in batch], [_load_images(s) for s in batch],
                videos if any(v is not None for v in videos) else None,
                max_new_tokens=budget[batch[0].question_id], timings=timings,
            )
            runtime = get_runtime(model)
            report = None if runtime is None else runtime.report
            if report is not None and report.num_visual.shape[0] == len(batch):
                visual["visual"] += int(report.num_visual.sum())
                visual["kept"] += int(report.num_kept.sum())
                visual["questions"] += len(batch)
            for sample, answer in zip(batch, answers, strict=True):
                handle.write(_record_line(sample, answer) + "\n")
            handle.flush()
            progress.update(len(batch))
    progress.close()
    if world > 1:
        shard = {"timings": timings.to_dict(), "visual_tokens": visual}
        (folder / f"timings.rank{rank}.json").write_text(json.dumps(shard))
    state.wait_for_everyone()
    if state.is_main_process:
        result = _merge_and_score(folder, benchmark, all_samples, samples, judge, world, timings, visual, config,
                                  limit=limit, batch_size=batch_size)
    state.wait_for_everyone()
    if not state.is_main_process:
        result = json.loads((folder / SCORES_NAME).read_text())
    return result


def _merge_and_score(folder: Path, benchmark: Benchmark, all_samples: Sequence[Sample], samples: Sequence[Sample],
                     judge: Any, world: int, timings: GenerationTimings, visual: dict[str, int],
                     config: dict[str, Any], *, limit: int | None, batch_size: int) -> dict[str, Any]:
    lines: dict[str, str] = {}
    shards = _shard_files(folder)
    for path in [folder / PREDICTIONS_NAME, *shards]:
        lines.update(read_predictions(path))
    # Benchmark order; answers of questions outside this run's selection (an earlier, larger --limit) are kept.
    order = [s.question_id for s in all_samples if s.question_id in lines]
    order += [qid for qid in lines if qid not in set(order)]
    _write_atomically(folder / PREDICTIONS_NAME, "".join(lines[qid] + "\n" for qid in order))
    if world > 1:
        for rank in range(world):
            path = folder / f"timings.rank{rank}.json"
            if rank > 0 or path.is_file():
                shard = json.loads(path.read_text())
                if rank > 0:
                    timings = timings.merge(GenerationTimings.from_dict(shard["timings"]))
                    visual = {key: visual[key] + shard["visual_tokens"][key] for key in visual}
            path.unlink(missing_ok=True)
    for path in shards:
        path.unlink()
    predictions = {s.question_id: json.loads(lines[s.question_id])["prediction"] for s in samples
                   if s.question_id in lines}
    scores = benchmark.score(predictions, samples, judge=judge)
    submission = None
    if not benchmark.has_public_answers:
        written = benchmark.write_submission(predictions, samples, folder / "submission.json")
        submission = None if written is None else str(written)
    result = {
        "benchmark": benchmark.name,
        "scores": scores,
        "timings": timings.to_dict(),
        # Over the questions answered in this run (a resumed run measures only its own).
        "visual_tokens": ({"total": visual["visual"], "kept": visual["kept"], "questions": visual["questions"]}
                          if visual["questions"] else None),
        "config": {**config, "limit": limit, "batch_size": batch_size, "num_processes": world,
                   "questions": len(samples)},
        "submission": submission,
    }
    (folder / SCORES_NAME).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


# -- configurations and compare mode --------------------------------------------------------------------------------

@dataclass(frozen=True)
class EvalConfiguration:
    """One model configuration of a comparison: uncompressed, a method at a rate, or a trained compressor.

    Attributes
    ----------
    name
        Label in the table and folder name under ``OUT``.
    compression
        Applied with :func:`divico.apply_compression`; None: uncompressed (or the compressor's saved config).
    compressor
        A trained compressor folder loaded with :func:`divico.load_compressor` (after ``compression``, if given,
        so its rate and layer apply).
    noise
        A perturbation of the visual input (:mod:`divico.perturbation`, Table II), or None: the clean input.
        Recorded in ``run_config.json``, so a resumed run with other noise is refused.
    """

    name: str
    compression: CompressionConfig | None = None
    compressor: Path | None = None
    noise: NoiseConfig | None = None

    @property
    def is_baseline(self) -> bool:
        return self.compression is None and self.compressor is None

    def describe(self) -> dict[str, Any]:
        """JSON facts for ``run_config.json``."""
        return {"configuration": self.name, "compressor": None if self.compressor is None else str(self.compressor),
                "noise": None if self.noise is None else self.noise.to_dict()}

    @classmethod
    def parse(cls, spec: str, *, default_layer: int = 2) -> EvalConfiguration:
        """A configuration from its command-line form.

        ``baseline``
            The uncompressed model.
        ``METHOD:KEEP[:OPTION...]``
            ``METHOD`` (a registered method) keeping ``KEEP`` visual tokens: a number with a decimal point is a
            keep ratio in (0, 1] (``0.111``), an integer a token count (``64``). Options: ``layer=K``,
            ``encoder=E``, ``compressor=DIR``, or a bare ``DIR`` (= ``compressor=DIR``).
        ``DIR``
            A trained compressor folder with its own saved method, rate and layer.
        ``LABEL=SPEC``
            Any of the above, named ``LABEL`` (default names: ``baseline``, ``METHOD@KEEP``, the folder's name).

        Raises
        ------
        ValueError
            An unknown method, a malformed rate or option, or a ``DIR`` without a compressor ``config.json``.
        """
        label = None
        head, sep, rest = spec.partition("=")
        if sep and ":" not in head and "/" not in head and head:
            label, spec = head, rest
        if not spec:
            raise ValueError(f"Empty configuration {spec!r}; expected baseline, METHOD:KEEP[:OPTION...] or DIR.")
        if spec == BASELINE:
            return cls(label or BASELINE)
        if ":" not in spec:
            read_saved_config(spec)  # a clear FileNotFoundError when DIR is no compressor
            return cls(label or Path(spec).name, compressor=Path(spec))
        method, keep_text, *options = spec.split(":")
        if method not in available_methods():
            raise ValueError(f"Unknown method {method!r} in configuration {spec!r}; known methods: "
                             f"{', '.join(available_methods())} (or 'baseline').")
        keep_ratio, keep_tokens = _parse_keep(keep_text, spec)
        layer, encoder, compressor = default_layer, "variational", None
        for option in options:
            key, has_value, value = option.partition("=")
            if has_value and key == "layer":
                if not value.isdigit():
                    raise ValueError(f"layer must be an integer >= 1 in configuration {spec!r}, got {value!r}.")
                layer = int(value)
            elif has_value and key == "encoder":
                encoder = value
            elif has_value and key == "compressor":
                compressor = Path(value)
            elif not has_value and option:
                compressor = Path(option)
            else:
                raise ValueError(f"Unknown option {option!r} in configuration {spec!r}; valid: layer=K, encoder=E, "
                                 "compressor=DIR or a bare DIR.")
        if compressor is not None:
            read_saved_config(compressor)
        compression = CompressionConfig(method=method, keep_ratio=keep_ratio, keep_tokens=keep_tokens, layer=layer,
                                        encoder=encoder)
        return cls(label or f"{method}@{keep_text}", compression=compression, compressor=compressor)


def _parse_keep(text: str, spec: str) -> tuple[float | None, int | None]:
    try:
        if "." in text or "e" in text.lower():
            return float(text), None
        return None, int(text)
    except ValueError:
        raise ValueError(f"KEEP must be a keep ratio with a decimal point (e.g. 0.111) or a token count (e.g. 64) "
                         f"in configuration {spec!r}, got {text!r}.") from None


def own_trained_modules(model: torch.nn.Module, configuration: EvalConfiguration) -> dict[str, torch.nn.Module]:
    """Modules of the model itself (not added by divico) whose weights the configuration's compressor overwrites
    when it is loaded (DeCo's projector), by name; empty without a compressor."""
    if configuration.compressor is None:
        return {}
    config = configuration.compression or saved_compression_config(configuration.compressor)
    # Without a compressor module, trainable_modules lists only modules that belong to the model.
    return get_method_class(config.method)(config).trainable_modules(get_adapter(unwrap_model(model)), None)


@contextmanager
def configured(model: torch.nn.Module, configuration: EvalConfiguration) -> Iterator[torch.nn.Module]:
    """``model`` set up as ``configuration`` for a ``with`` block (its noise included), restored after it: no
    compression, no LoRA, no noise, and the weights of its own modules that a loaded compressor overwrote (DeCo's
    projector) back, so the next configuration of a comparison starts from the stock model.

    Raises
    ------
    ValueError
        If ``model`` already carries a compression or LoRA layers (it must start as the stock model).
    """
    if get_runtime(model) is not None or has_lora(model):
        raise ValueError("compare mode needs the stock model: remove its compression / LoRA first.")
    noise_hooks = None
    own_modules = own_trained_modules(model, configuration)
    own_weights = {name: {key: value.detach().clone() for key, value in module.state_dict().items()}
                   for name, module in own_modules.items()}
    try:
        compression, compressor = configuration.compression, configuration.compressor
        if compression is not None and compressor is not None:
            # A trained compressor at the rate / layer asked for: its weight-shaping fields stay as saved.
            given = {name: getattr(compression, name) for name in ("method", "keep_ratio", "keep_tokens", "layer",
                                                                    "encoder")}
            apply_compression(model, saved_compression_config(compressor, **given))
            load_compressor(model, compressor, override_config=True)
        elif compression is not None:
            apply_compression(model, compression)
        elif compressor is not None:
            load_compressor(model, compressor)
        if configuration.noise is not None:
            noise_hooks = add_noise(model, configuration.noise)
        model.eval()
        yield model
    finally:
        if noise_hooks is not None:
            noise_hooks.remove()
        remove_compression(model)
        if has_lora(model):
            unload_lora(model)
        for name, module in own_modules.items():
            module.load_state_dict(own_weights[name])


def score_configurations(
    model: torch.nn.Module,
    processor: Any,
    configurations: Sequence[EvalConfiguration],
    benchmarks: Sequence[Benchmark],
    out_dir: str | Path,
    **options: Any,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Evaluate every configuration (its noise included) on every benchmark with one loaded model, into
    ``OUT/<configuration>/<benchmark>/``, each configuration set up by :func:`configured` and undone after it.

    Parameters and the returned dict are those of :func:`compare_configurations`, which adds the table.
    """
    names = [c.name for c in configurations]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"Configuration names must be unique, {duplicates} repeat; name them with LABEL=SPEC.")
    run_info = dict(options.pop("run_info", None) or {})
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for configuration in configurations:
        with configured(model, configuration):
            results[configuration.name] = {
                benchmark.name: evaluate_benchmark(model, processor, benchmark, Path(out_dir) / configuration.name,
                                                   run_info={**run_info, **configuration.describe()}, **options)
                for benchmark in benchmarks
            }
    return results


def compare_configurations(
    model: torch.nn.Module,
    processor: Any,
    configurations: Sequence[EvalConfiguration],
    benchmarks: Sequence[Benchmark],
    out_dir: str | Path,
    **options: Any,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Evaluate every configuration on every benchmark with one loaded model; write ``OUT/table.md``.

    Parameters
    ----------
    model, processor
        The stock model (no compression) and its processor.
    configurations
        In table order (e.g. baseline, fastv@0.111, divico@0.111); names must be unique.
    benchmarks
        Benchmark instances.
    out_dir
        ``OUT``; configuration c writes ``OUT/<c.name>/<benchmark>/``.
    **options
        Passed to :func:`evaluate_benchmark` (limit, batch_size, max_new_tokens, judge, show_progress, run_info,
        num_frames).

    Returns
    -------
    dict
        ``configuration name -> benchmark name -> evaluate_benchmark result``.
    """
    results = score_configurations(model, processor, configurations, benchmarks, out_dir, **options)
    if process_state().is_main_process:
        table = format_comparison_table(results, [b.name for b in benchmarks])
        (Path(out_dir) / TABLE_NAME).write_text(table + "\n")
    return results


def _rate(result: Mapping[str, Any]) -> str:
    compression = result["config"].get("compression")
    if compression is None:
        return "-"
    if compression.get("keep_ratio") is not None:
        return f"{100.0 * (1.0 - compression['keep_ratio']):.1f}%"
    return f"keep {compression['keep_tokens']}"


def _headline(result: Mapping[str, Any]) -> float | None:
    score = result["scores"].get("score")
    return None if score is None else float(score)


def format_comparison_table(results: Mapping[str, Mapping[str, Mapping[str, Any]]], benchmarks: Sequence[str]) -> str:
    """Markdown table in the shape of the paper's Table I.

    One row per configuration (in the order of ``results``): the compression rate (share of visual tokens
    removed; ``keep N`` for a token count), the mean visual tokens kept / total per question, the mean prefill time
    per ``generate`` call and each benchmark's headline score. Below the configurations of a rate that has two or
    more, an "Improvement" row: the relative change (in %) of the *last* of them (list the proposed method last, as
    in Table I) over the best of the others, per benchmark.

    Parameters
    ----------
    results
        ``configuration -> benchmark -> evaluate_benchmark result``.
    benchmarks
        Column order.
    """
    lines = ["| Rate | Configuration | Visual tokens | Prefill (ms) | " + " | ".join(benchmarks) + " |",
             "|" + "---|" * (len(benchmarks) + 4)]
    rates = {name: _rate(per_benchmark[benchmarks[0]]) for name, per_benchmark in results.items()}
    groups: dict[str, list[str]] = {}
    for name, rate in rates.items():
        if rate != "-":
            groups.setdefault(rate, []).append(name)

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    for name, per_benchmark in results.items():
        runs = [per_benchmark[b] for b in benchmarks]
        counted = [r["visual_tokens"] for r in runs if r.get("visual_tokens")]
        questions = sum(t["questions"] for t in counted)
        tokens = (f"{sum(t['kept'] for t in counted) / questions:.1f}/{sum(t['total'] for t in counted) / questions:.1f}"
                  if questions else "all")
        batches = sum(r["timings"]["batches"] for r in runs)
        prefill = 1000.0 * sum(r["timings"]["prefill_seconds"] for r in runs) / batches if batches else None
        lines.append(f"| {rates[name]} | {name} | {tokens} | {cell(prefill)} | "
                     + " | ".join(cell(_headline(r)) for r in runs) + " |")
        group = groups.get(rates[name], [])
        if len(group) >= 2 and group[-1] == name:
            improvements = []
            for b in benchmarks:
                ours = _headline(results[name][b])
                others = [s for s in (_headline(results[n][b]) for n in group[:-1]) if s is not None]
                best = max(others) if others else None
                improvements.append("-" if ours is None or not best else f"{100.0 * (ours - best) / abs(best):+.1f}%")
            lines.append(f"| {rates[name]} | Improvement ({name} vs best other) | | | " + " | ".join(improvements)
                         + " |")
    return "\n".join(lines)
