"""`divico bench`: FLOPs, prefill/decode latency, peak memory and KV cache of each compression method.

Every configuration (method x keep count x layer K) is one row, measured on the same model instance
and the same inputs: analytic FLOPs (truncated and full depth), prefill time (median and IQR, with the
vision tower, projector and every decoder layer timed by hooks so the LLM-only part and a per-layer
extrapolation to full depth come from the same calls), compressor overhead, peak tensor memory, KV
cache per layer and, optionally, per-token decode time. Rows are appended to ``results.json`` as they
finish, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import torch
from tqdm import tqdm

from divico.api import apply_compression, last_report, remove_compression
from divico.config import CompressionConfig
from divico.efficiency import flops as flops_mod
from divico.efficiency import measure, presets
from divico.registry import available_methods, get_method_class

#: The method whose official scoring (full N x N attention at K-1) --reference-fastv adds as a reference row.
REFERENCE_METHOD = "fastv"


def method_choices() -> tuple[str, ...]:
    """``none`` (the uncompressed model) and every registered method."""
    return ("none", *available_methods())
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def _int_list(text: str) -> list[int]:
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from error
    if not values or any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _ratio_list(text: str) -> list[float]:
    try:
        values = [float(item) for item in text.split(",") if item.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated ratios, got {text!r}") from error
    if not values or any(not 0.0 < value <= 1.0 for value in values):
        raise argparse.ArgumentTypeError(f"keep ratios must be in (0, 1], got {text!r}")
    return values


def _method_list(text: str) -> list[str]:
    methods = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [method for method in methods if method not in method_choices()]
    if not methods or unknown:
        raise argparse.ArgumentTypeError(f"unknown methods {unknown or text!r}; valid: {', '.join(method_choices())}")
    return methods


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure FLOPs, latency and memory of compression methods",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True,
                        help=f"preset ({', '.join(presets.preset_names())}: random weights of the real shapes), "
                        "directory or hub id")
    parser.add_argument("--layers", type=int, default=None,
                        help="keep only the first N decoder layers; figures are also extrapolated to full depth")
    parser.add_argument("--methods", type=_method_list, default=list(method_choices()),
                        help=f"comma-separated subset of {','.join(method_choices())} (default: all)")
    keep = parser.add_mutually_exclusive_group()
    keep.add_argument("--keep-ratios", type=_ratio_list, default=None, help="e.g. 0.111,0.25")
    keep.add_argument("--keep-tokens", type=_int_list, default=None, help="e.g. 64,144 (default 64)")
    parser.add_argument("--layer-k", type=_int_list, default=[2], help="compression layer(s) K, e.g. 2 or 2,8")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--visual-tokens", type=int, default=576,
                        help="visual tokens per sample (presets: n images of an s x s grid, fewest n)")
    parser.add_argument("--text-tokens", type=int, default=60, help="text tokens after the image(s)")
    parser.add_argument("--system-tokens", type=int, default=0, help="text tokens before the image(s)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--decode-tokens", type=int, default=0,
                        help="also time generate() with this many new tokens (0: prefill only)")
    parser.add_argument("--encoder-hidden-size", type=_int_list, default=None,
                        help="DiViCo's g_theta width(s), e.g. 512 or 4096,512: one divico row per width "
                             "(default: CompressionConfig's default)")
    parser.add_argument("--reference-fastv", action="store_true",
                        help="add a fastv row scored like the official code (full N x N attention at K-1)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--count-flops", action="store_true",
                        help="also count FLOPs of one call with torch FlopCounterMode (dense attention)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output directory (results.json, bench.png)")
    parser.set_defaults(func=run)


def _validate(args: argparse.Namespace) -> None:
    for name, minimum in (("batch_size", 1), ("visual_tokens", 1), ("text_tokens", 0), ("system_tokens", 0),
                          ("repeats", 1), ("warmup", 0), ("decode_tokens", 0)):
        value = getattr(args, name)
        if value < minimum:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")
    if args.decode_tokens == 1:
        raise ValueError("--decode-tokens must be 0 (off) or >= 2")
    if args.layers is not None and args.layers < 1:
        raise ValueError(f"--layers must be >= 1, got {args.layers}")


def _row_plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One entry per measured configuration, the uncompressed one first."""
    keeps: list[tuple[str, float | int]]
    if args.keep_ratios is not None:
        keeps = [("keep_ratio", ratio) for ratio in args.keep_ratios]
    else:
        keeps = [("keep_tokens", count) for count in (args.keep_tokens or [64])]
    plan: list[dict[str, Any]] = []
    if "none" in args.methods:
        plan.append({"name": "none", "method": "none", "scoring": "sdpa", "layer": 0, "keep": None})
    for method in [m for m in args.methods if m != "none"]:
        layers = args.layer_k if get_method_class(method).level == "layer" else [0]
        widths: list[int | None] = [None]
        # Methods with a gap encoder (DiViCo) get one row per --encoder-hidden-size width.
        if args.encoder_hidden_size and hasattr(get_method_class(method), "encoder_width"):
            widths = list(args.encoder_hidden_size)
        for key, value in keeps:
            for layer in layers:
                for width in widths:
                    name = method if len(widths) == 1 else f"{method}-h{width}"
                    entry = {"name": name, "method": method, "scoring": "sdpa", "layer": layer, "keep": {key: value}}
                    if width is not None:
                        entry["encoder_hidden_size"] = width
                    plan.append(entry)
    if args.reference_fastv:
        for key, value in keeps:
            for layer in args.layer_k:
                plan.append({"name": f"{REFERENCE_METHOD}-ref", "method": REFERENCE_METHOD,
                             "scoring": "full_attention", "layer": layer, "keep": {key: value}})
    return plan


def _row_key(row: dict[str, Any]) -> str:
    return json.dumps([row["name"], row["layer"], row["keep"]], sort_keys=True)


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def run(args: argparse.Namespace) -> int:
    _validate(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, DTYPES[args.dtype])
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / "results.json"

    model = presets.load_model(args.model, layers=args.layers, dtype=dtype,
                               visual_tokens=args.visual_tokens if args.model in presets.PRESETS else None)
    model.to(device)
    config = model.config
    vision = config.vision_config
    per_image = (vision.image_size // vision.patch_size) ** 2
    if args.visual_tokens % per_image:
        raise ValueError(f"--visual-tokens {args.visual_tokens} is not a multiple of the {per_image} tokens per image")
    prompt = presets.PromptShape(visual_tokens=args.visual_tokens, text_tokens=args.text_tokens,
                                 system_tokens=args.system_tokens, batch_size=args.batch_size,
                                 images=args.visual_tokens // per_image)
    inputs = presets.build_inputs(config, prompt, device=device, dtype=dtype, seed=args.seed)
    layers_run = config.text_config.num_hidden_layers
    full_depth = int(getattr(config, "divico_full_num_hidden_layers", layers_run))

    settings = {key: value for key, value in vars(args).items() if key != "func"}
    settings.update({"device": str(device), "layers_run": layers_run, "full_depth": full_depth,
                     "images": prompt.images, "seq_len": prompt.seq_len, "torch": torch.__version__,
                     "threads": torch.get_num_threads()})
    previous: dict[str, Any] = {}
    if results_path.exists():
        saved = json.loads(results_path.read_text())
        if saved.get("settings") == settings:
            previous = {_row_key(row): row for row in saved.get("rows", [])}
    rows: list[dict[str, Any]]
    decoder_layers = list(model.model.language_model.layers)
    context = _Context(model, inputs, prompt, args, device, decoder_layers, full_depth, flops_mod, measure)

    def save() -> None:
        results_path.write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))

    # Phase 1, one configuration at a time: analytic FLOPs, KV cache, report, FlopCounterMode, peak memory.
    rows = []
    for plan in tqdm(_row_plan(args), desc="bench: memory and FLOPs", unit="config"):
        row = previous.get(_row_key(plan)) or _static_row(plan, context)
        rows.append(row)
        save()
    # Phase 2, timing rounds that visit every configuration once, so a slow spell of a shared machine
    # affects all configurations alike instead of one of them.
    done = min(len(row.get("samples", {}).get("prefill", [])) for row in rows)
    warmup = args.warmup if done < args.repeats else 0
    for round_index in tqdm(range(warmup + args.repeats - done), desc="bench: timing rounds", unit="round"):
        timed = round_index >= warmup
        for row in rows:
            if timed and len(row.get("samples", {}).get("prefill", [])) >= args.repeats:
                continue
            _timing_round(row, context, record=timed)
        if timed:
            save()
    for row in rows:
        _summarise_timing(row, context)
    _attach_ratios(rows)
    save()
    print(format_table(rows, settings))
    _plot(rows, out_dir / "bench.png", settings)
    print(f"wrote {results_path} and {out_dir / 'bench.png'}")
    return 0


class _Context:
    """What every measurement needs: the model, its inputs and the run's settings."""

    def __init__(self, model: Any, inputs: dict[str, Any], prompt: Any, args: argparse.Namespace, device: Any,
                 decoder_layers: list[Any], full_depth: int, flops_mod: Any, measure: Any) -> None:
        self.model = model
        self.inputs = inputs
        self.prompt = prompt
        self.args = args
        self.device = device
        self.decoder_layers = decoder_layers
        self.full_depth = full_depth
        self.flops = flops_mod
        self.measure = measure

    def prefill(self) -> Any:
        return self.model(**self.inputs, use_cache=True, logits_to_keep=1)


def _apply(model: Any, plan: dict[str, Any]) -> bool:
    """Attach the plan's compression; returns whether something was attached."""
    config = _compression(plan)
    if config is None:
        return False
    apply_compression(model, config)
    return True


def _compression(plan: dict[str, Any]) -> CompressionConfig | None:
    """The plan's compression config (None for the uncompressed row)."""
    if plan["method"] == "none":
        return None
    extra = {"encoder_hidden_size": plan["encoder_hidden_size"]} if plan.get("encoder_hidden_size") else {}
    return CompressionConfig(method=plan["method"], layer=max(plan["layer"], 1), scoring=plan["scoring"],
                             **plan["keep"], **extra)


def _remove(model: Any, attached: bool) -> None:
    if attached:
        remove_compression(model)


def _count_kwargs(plan: dict[str, Any]) -> dict[str, Any]:
    return dict(compression=_compression(plan))


def _static_row(plan: dict[str, Any], ctx: _Context) -> dict[str, Any]:
    analytic = ctx.flops.count_flops(ctx.model.config, ctx.prompt, **_count_kwargs(plan))
    analytic_full = ctx.flops.count_flops(ctx.model.config, ctx.prompt, num_layers=ctx.full_depth,
                                          **_count_kwargs(plan))
    row: dict[str, Any] = {**plan, "keep_tokens": analytic.keep_tokens, "flops": analytic.to_dict(),
                           "flops_full_depth": analytic_full.to_dict()}
    attached = _apply(ctx.model, plan)
    try:
        with torch.inference_mode():
            output = ctx.prefill()
            cache = getattr(output, "past_key_values", None) or getattr(output, "cache", None)
            kv = ctx.measure.kv_cache_bytes(cache) if cache is not None else []
            del output, cache
            layers_run = len(ctx.decoder_layers)
            row["kv_bytes_per_layer"] = kv
            row["kv_bytes"] = sum(kv)
            # Layers >= K; uncompressed and DeCo rows use the smallest K benchmarked, to compare like with like.
            row["kv_bytes_from_k"] = sum(kv[plan["layer"] or min(ctx.args.layer_k):])
            row["kv_bytes_full_depth"] = sum(kv) + (ctx.full_depth - layers_run) * (kv[-1] if kv else 0)
            if attached:
                report = last_report(ctx.model)
                row["report"] = {"layer": int(report.layer), "seq_len_before": int(report.seq_len_before),
                                 "seq_len_after": int(report.seq_len_after)}
            if ctx.args.count_flops:
                counted, _ = ctx.measure.measure_flops(ctx.prefill)
                dense = ctx.flops.count_flops(ctx.model.config, ctx.prompt, attention="dense", **_count_kwargs(plan))
                row["flop_counter"] = {"measured": counted, "analytic_dense": dense.total}
            if not ctx.args.no_memory:
                memory = ctx.measure.measure_peak_memory(ctx.prefill, ctx.model, device=ctx.device)
                row["memory"] = memory.to_dict()
    finally:
        _remove(ctx.model, attached)
    return row


def _timing_round(row: dict[str, Any], ctx: _Context, record: bool) -> None:
    """One prefill (vision tower, projector and each decoder layer timed by hooks) and, if asked, one
    generation; appended to ``row["samples"]`` when ``record``."""
    attached = _apply(ctx.model, row)
    modules = [ctx.model.model.vision_tower, ctx.model.model.multi_modal_projector] + ctx.decoder_layers
    timer = ctx.measure.LayerTimer(modules, device=ctx.device)
    try:
        with torch.inference_mode():
            total = ctx.measure.time_call(ctx.prefill, repeats=1, warmup=0, device=ctx.device).samples[0]
        durations = [sum(values) for values in timer.seconds()]
        timer.remove()
        generation = None
        if ctx.args.decode_tokens:
            generation = ctx.measure.time_generation(ctx.model, ctx.inputs, new_tokens=ctx.args.decode_tokens,
                                                     repeats=1, warmup=0, device=ctx.device)
    finally:
        timer.remove()
        _remove(ctx.model, attached)
    if not record:
        return
    samples = row.setdefault("samples", {"prefill": [], "vision": [], "layers": [], "ttft": [], "decode": []})
    samples["prefill"].append(total)
    samples["vision"].append(durations[0] + durations[1])
    samples["layers"].append(durations[2:])
    if generation is not None:
        samples["ttft"].append(generation["ttft"].samples[0])
        samples["decode"].append(generation["decode"].samples[0])


def _summarise_timing(row: dict[str, Any], ctx: _Context) -> None:
    measure = ctx.measure
    samples = row["samples"]
    totals, vision = samples["prefill"], samples["vision"]
    layer_totals = [sum(layers) for layers in samples["layers"]]
    row["prefill_s"] = measure.TimingStats(list(totals)).to_dict()
    row["vision_s"] = _median(vision)
    llm_only = measure.TimingStats([t - v for t, v in zip(totals, vision, strict=True)])
    row["llm_prefill_s"] = llm_only.to_dict()
    # Time outside the decoder layers after the projector: embeddings, masks, LM head, and the compressor's
    # own work (its hooks run outside the per-layer timings).
    row["outside_layers_s"] = _median([t - v - lt for t, v, lt in zip(totals, vision, layer_totals, strict=True)])
    per_layer = [_median(list(values)) for values in zip(*samples["layers"])]
    row["per_layer_s"] = per_layer
    # Sum of per-layer medians: less sensitive than the total to stalls on a shared machine.
    row["llm_layers_s"] = sum(per_layer)
    config = _compression(row)
    first_short = (0 if config is None
                   else get_method_class(config.method)(config).compression_layers(len(ctx.decoder_layers))[0])
    per_short_layer = _median(per_layer[first_short:] or per_layer)
    row["llm_prefill_full_depth_s"] = (llm_only.median
                                       + (ctx.full_depth - len(ctx.decoder_layers)) * per_short_layer)
    if samples["decode"]:
        row["ttft_s"] = measure.TimingStats(list(samples["ttft"])).to_dict()
        row["decode_s"] = measure.TimingStats(list(samples["decode"])).to_dict()


def _attach_ratios(rows: list[dict[str, Any]]) -> None:
    """Add ratios to the uncompressed row (when measured) and the measured compressor overhead."""
    base = next((row for row in rows if row["method"] == "none"), None)
    if base is None:
        return
    for row in rows:
        ratios = {
            "flops_total": row["flops"]["total"] / base["flops"]["total"],
            "flops_llm": row["flops"]["llm_prefill"] / base["flops"]["llm_prefill"],
            "flops_llm_full_depth": row["flops_full_depth"]["llm_prefill"] / base["flops_full_depth"]["llm_prefill"],
            "paper_eq10": row["flops"]["paper_eq10"] / base["flops"]["paper_eq10"],
            "prefill": row["prefill_s"]["median"] / base["prefill_s"]["median"],
            "llm_prefill": row["llm_prefill_s"]["median"] / base["llm_prefill_s"]["median"],
            "llm_prefill_full_depth": row["llm_prefill_full_depth_s"] / base["llm_prefill_full_depth_s"],
        }
        ratios["llm_time_over_flops"] = ratios["llm_prefill"] / ratios["flops_llm"]
        ratios["llm_layers"] = row["llm_layers_s"] / base["llm_layers_s"]
        ratios["flops_layers"] = (sum(row["flops"]["per_layer_flops"]) / sum(base["flops"]["per_layer_flops"]))
        if "memory" in row and "memory" in base:
            ratios["peak_memory"] = row["memory"]["total_bytes"] / base["memory"]["total_bytes"]
            ratios["activation_memory"] = row["memory"]["peak_bytes"] / base["memory"]["peak_bytes"]
        if base["kv_bytes"]:
            ratios["kv"] = row["kv_bytes"] / base["kv_bytes"]
            ratios["kv_full_depth"] = row["kv_bytes_full_depth"] / base["kv_bytes_full_depth"]
        if "decode_s" in row and "decode_s" in base:
            ratios["decode"] = row["decode_s"]["median"] / base["decode_s"]["median"]
        row["ratios"] = ratios
        overhead = row["outside_layers_s"] - base["outside_layers_s"]
        row["overhead_s"] = overhead
        row["overhead_share"] = overhead / row["prefill_s"]["median"]
        row["overhead_flops_share"] = (row["flops"]["scoring"] + row["flops"]["compressor"]) / row["flops"]["total"]


def format_table(rows: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    """Plain-text table of the measured rows (times in ms, memory in MiB)."""
    header = (f"{'method':<10}{'k':>5}{'K':>3} {'GFLOPs':>9}{'FLOPr':>7}{'LLMFr':>7} {'prefill':>9}{'±IQR':>7}"
              f"{'ratio':>7} {'LLM ms':>9}{'Lyr r':>7}{'LyrF r':>7}{'ratio':>7}{'t/F':>6} {'ovh%':>6} {'peakMiB':>9}{'ratio':>7}"
              f" {'KV MiB':>8}{'decode':>8}{'ratio':>7}")
    title = (f"model={settings['model']} layers={settings['layers_run']}/{settings['full_depth']} "
             f"dtype={settings['dtype']} device={settings['device']} batch={settings['batch_size']} "
             f"N={settings['seq_len']} (visual {settings['visual_tokens']})")
    lines = [title, header]
    for row in rows:
        ratios = row.get("ratios", {})
        memory = row.get("memory", {})
        decode = row.get("decode_s", {}).get("median")
        lines.append(
            f"{row['name']:<10}{row['keep_tokens']:>5}{row['layer']:>3} {row['flops']['total'] / 1e9:>9.1f}"
            f"{ratios.get('flops_total', float('nan')):>7.3f}{ratios.get('flops_llm', float('nan')):>7.3f} "
            f"{row['prefill_s']['median'] * 1e3:>9.1f}{row['prefill_s']['iqr'] * 1e3:>7.1f}"
            f"{ratios.get('prefill', float('nan')):>7.3f} {row['llm_prefill_s']['median'] * 1e3:>9.1f}"
            f"{ratios.get('llm_layers', float('nan')):>7.3f}{ratios.get('flops_layers', float('nan')):>7.3f}"
            f"{ratios.get('llm_prefill', float('nan')):>7.3f}{ratios.get('llm_time_over_flops', float('nan')):>6.2f} "
            f"{row.get('overhead_share', float('nan')) * 100:>6.2f} "
            f"{memory.get('total_bytes', float('nan')) / 2**20:>9.1f}{ratios.get('peak_memory', float('nan')):>7.3f}"
            f" {row['kv_bytes'] / 2**20:>8.1f}{(decode or float('nan')) * 1e3:>8.1f}"
            f"{ratios.get('decode', float('nan')):>7.3f}"
        )
    lines.append("FLOPr/LLMFr: analytic FLOPs ratio to 'none' (whole model / after the projector); LLM ms: prefill "
                 "minus vision tower and projector; Lyr r / LyrF r: ratio of the summed per-layer median times / of "
                 "the decoder layers' FLOPs; ratio, t/F: LLM-prefill time ratio and its quotient by LLMFr; ovh%: "
                 "compressor time share of prefill; decode: ms/token.")
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: Path, settings: dict[str, Any]) -> None:
    matplotlib.use("Agg")  # files only; never open a window
    labels = [f"{row['name']}\nk={row['keep_tokens']} K={row['layer']}" for row in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(rows)), 4))
    positions = range(len(rows))
    width = 0.4
    flops_ratio = [row.get("ratios", {}).get("flops_llm", float("nan")) for row in rows]
    time_ratio = [row.get("ratios", {}).get("llm_prefill", float("nan")) for row in rows]
    left.bar([p - width / 2 for p in positions], flops_ratio, width, label="analytic FLOPs (LLM)")
    left.bar([p + width / 2 for p in positions], time_ratio, width, label="measured LLM prefill")
    left.set_xticks(list(positions), labels, fontsize=7)
    left.set_ylabel("ratio to uncompressed")
    left.legend(fontsize=7)
    # Above the resident weights: the weights dominate a truncated model and hide the difference.
    memory = [row.get("memory", {}).get("peak_bytes", float("nan")) / 2**20 for row in rows]
    kv = [row.get("kv_bytes", float("nan")) / 2**20 for row in rows]
    right.bar([p - width / 2 for p in positions], memory, width, color="tab:green", label="peak above weights")
    right.bar([p + width / 2 for p in positions], kv, width, color="tab:olive", label="KV cache after prefill")
    right.set_xticks(list(positions), labels, fontsize=7)
    right.set_ylabel("MiB")
    right.legend(fontsize=7)
    figure.suptitle(f"{settings['model']} ({settings['layers_run']}/{settings['full_depth']} layers, "
                    f"{settings['dtype']}, {settings['device']}, N={settings['seq_len']})", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
