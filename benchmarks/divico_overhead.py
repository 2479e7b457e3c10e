"""DiViCo's cost beyond FastV, and the width of g_theta: timing of each part, and accuracy per width.

Two measurements (the end-to-end acceptance figure is ``divico bench``, see ``prefill_7b_shape.py``):

``parts``: the work DiViCo's :meth:`~divico.methods.divico.DiViCo.compress` does on top of FastV's gather, at
LLaVA-1.5-7B sizes (d = 4096, 576 visual + 60 text tokens, keep 64), for several g_theta widths, next to one
124-token decoder-layer GEMM of the same model as the yardstick of what a FLOP costs on this machine. Every
configuration is visited once per round, in alternating order, and medians are reported::

    python benchmarks/divico_overhead.py parts --dtype fp32 --widths 4096,2048,1024,512

``widths``: trains a DiViCo compressor (keep 11.1%, K = 2) on the trained default model (the testbed's shipped
stage 2) for each width with the recipe's compressor stage (90 steps, lr 2e-4, LoRA r = 8 on q/k/v/o, beta 0.02,
batch 4, bf16 autocast, seed 0), then scores each on the validation conversations (held-out LM loss on the
assistant tokens, float32) next to the uncompressed base, training-free FastV and the shipped checkpoints::

    python benchmarks/divico_overhead.py widths --widths 72,576 --out runs/divico_widths

The data is the demo's (``divico make-data --out ~/.cache/divico/demo-data``, generated if missing).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import divico
from divico.config import CompressionConfig
from divico.methods.base import TextShape
from divico.methods.divico import DiViCo, GapEncoder
from divico.methods.fastv import FastV
from divico.selection import TokenSelection, top_k_keep_mask
from divico.training import TrainingConfig, train
from divico.training.data import LeftPaddingCollator, LlavaJsonDataset, pad_token_id_of
from divico_testbed.data import benchmark_data_current, write_benchmark_splits
from divico_testbed.default_model import default_cache_root
from divico_testbed.recipe import ASSETS_DIR, ATTENTION_LORA_TARGETS, RecipeConfig, load_base


def _int_list(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item.strip()]


# --- parts ----------------------------------------------------------------------------------------------------
def run_parts(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    generator = torch.Generator().manual_seed(0)
    batch, visual, text, d, keep, mlp = 1, 576, 60, 4096, 64, 11008
    length = visual + text
    is_visual = torch.zeros(batch, length, dtype=torch.bool)
    is_visual[:, :visual] = True
    scores = torch.rand(batch, length, generator=generator)
    selection = TokenSelection.from_keep_mask(top_k_keep_mask(scores, is_visual, torch.tensor([keep])), is_visual)
    hidden = torch.randn(batch, length, d, generator=generator).to(dtype)
    fastv = FastV(CompressionConfig("fastv", keep_tokens=keep))
    methods: dict[str, tuple[Any, Any]] = {}
    for width in args.widths:
        method = DiViCo(CompressionConfig("divico", keep_tokens=keep, encoder_hidden_size=width))
        encoder = _encoder(method, d, dtype)
        methods[f"divico h={width}"] = (method, encoder)
    layer_weight = torch.randn(mlp, d, generator=generator).to(dtype) * 0.01
    short = torch.randn(keep + text, d, generator=generator).to(dtype)  # a decoder layer >= K sees 124 tokens
    calls = {"fastv gather": lambda: fastv.compress(hidden, selection, None),
             "mlp GEMM 124x4096x11008": lambda: torch.nn.functional.linear(short, layer_weight)}
    for name, (method, encoder) in methods.items():
        calls[name] = lambda method=method, encoder=encoder: method.compress(hidden, selection, encoder)
        rows, pooled = hidden[0, :keep], hidden[0, :keep]
        calls[name + " (g_theta only)"] = lambda encoder=encoder, rows=rows, pooled=pooled: encoder(rows, pooled)
    flops = {"fastv gather": 0, "mlp GEMM 124x4096x11008": 2 * short.shape[0] * d * mlp}
    for name, (method, _) in methods.items():
        shape = TextShape(hidden_size=d, num_heads=32, head_dim=128)
        total = method.overhead_flops(shape, length, keep)["compressor"]
        flops[name] = total
        flops[name + " (g_theta only)"] = total - 2 * length * d
    samples: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    with torch.inference_mode():
        for round_index in range(args.warmup + args.repeats):
            order = names if round_index % 2 == 0 else names[::-1]
            for name in order:
                start = time.perf_counter()
                calls[name]()
                elapsed = time.perf_counter() - start
                if round_index >= args.warmup:
                    samples[name].append(elapsed)
    reference = statistics.median(samples["mlp GEMM 124x4096x11008"]) / flops["mlp GEMM 124x4096x11008"]
    gather = statistics.median(samples["fastv gather"])
    print(f"dtype={args.dtype} threads={torch.get_num_threads()} cpu={torch.backends.cpu.get_cpu_capability()} "
          f"rounds={args.repeats} (medians, ms)")
    print(f"{'call':<34}{'ms':>9}{'GFLOPs':>9}{'GFLOP/s':>9}{'time / (FLOPs at GEMM speed)':>30}")
    for name in names:
        median = statistics.median(samples[name])
        extra = median - (gather if name.startswith("divico") and "only" not in name else 0.0)
        rate = flops[name] / median / 1e9 if flops[name] else float("nan")
        ratio = extra / (flops[name] * reference) if flops[name] else float("nan")
        print(f"{name:<34}{median * 1e3:>9.2f}{flops[name] / 1e9:>9.2f}{rate:>9.1f}{ratio:>30.2f}")
    print("time / (FLOPs at GEMM speed): the call's time beyond FastV's gather divided by its counted FLOPs at the "
          "speed of the 124-token decoder-layer GEMM (1.00 = as efficient as a compressed decoder layer).")
    return 0


def _encoder(method: Any, hidden_size: int, dtype: torch.dtype) -> torch.nn.Module:
    """An eval-mode g_theta with random (not zero) output weights, so the timed work is the real work."""
    width = method.encoder_width(hidden_size)
    encoder = GapEncoder(hidden_size, width, variational=True, init_sigma=1e-2)
    torch.nn.init.normal_(encoder.fc2.weight, std=1.0 / math.sqrt(width))
    return encoder.to(dtype).eval()


# --- widths ---------------------------------------------------------------------------------------------------
def run_widths(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = RecipeConfig()
    ratio = 1 / 9
    data = Path(args.data) if args.data else default_cache_root() / "demo-data"
    if not benchmark_data_current(data):
        write_benchmark_splits(data, seed=0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stage2 = Path(args.stage2) if args.stage2 else ASSETS_DIR / "stage2"
    results_path = out / "results.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.is_file() else {}

    runs: dict[str, dict[str, Any]] = {}
    for width in args.widths:
        for seed in args.seeds:
            name = f"divico-h{width}" + ("" if seed == 0 else f"-seed{seed}")
            runs[name] = {"width": width, "seed": seed, "checkpoint": str(out / name)}
    for width in args.widths:
        for seed in args.seeds:
            name = f"divico-h{width}" + ("" if seed == 0 else f"-seed{seed}")
            target = out / name
            if (target / "config.json").is_file():
                continue
            model, processor = load_base(stage2, image_size=recipe.image_size)
            tic = time.perf_counter()
            train(model, processor, TrainingConfig(
                data_path=data / "llava_train.json", image_folder=data, output_dir=target,
                compression=divico.CompressionConfig("divico", keep_ratio=ratio, layer=recipe.layer,
                                                     encoder_hidden_size=width),
                beta=recipe.beta, lora_r=recipe.compressor_lora_r, lora_alpha=2 * recipe.compressor_lora_r,
                lora_dropout=recipe.lora_dropout, lora_target_modules=ATTENTION_LORA_TARGETS,
                learning_rate=recipe.compressor_lr, max_steps=args.steps, per_device_batch_size=recipe.batch_size,
                seed=seed, logging_steps=5, save_steps=10, save_total_limit=1, warmup=0.05, bf16=recipe.bf16,
                show_progress=False,
            ))
            results.setdefault("train_seconds", {})[name] = time.perf_counter() - tic
            results_path.write_text(json.dumps(results, indent=1))
            print(f"trained {name} in {results['train_seconds'][name]:.0f} s", flush=True)
            del model

    evaluations: dict[str, dict[str, Any]] = {"base (uncompressed)": {}, "fastv (training-free)": {}}
    shipped = ASSETS_DIR / "compressors"
    if args.stage2 is None:
        evaluations["shipped divico-keep11.1 (h=288)"] = {"checkpoint": str(shipped / "divico-keep11.1")}
        evaluations["shipped variant_a-keep11.1 (fastv + LoRA)"] = {"checkpoint": str(shipped / "variant_a-keep11.1")}
    evaluations.update(runs)
    base, processor = load_base(stage2, image_size=recipe.image_size)
    dataset = LlavaJsonDataset(data / "llava_validation.json", processor, data)
    count = len(dataset) if args.eval_records is None else min(args.eval_records, len(dataset))
    collate = LeftPaddingCollator(pad_token_id_of(processor))
    batches = [collate([dataset[i] for i in range(start, min(start + 8, count))]) for start in range(0, count, 8)]
    scores = results.setdefault("validation", {})
    for name, spec in evaluations.items():
        if name in scores:
            continue
        model = copy.deepcopy(base)
        if "checkpoint" in spec:
            divico.load_compressor(model, spec["checkpoint"])
        elif name.startswith("fastv"):
            divico.apply_compression(model, divico.CompressionConfig("fastv", keep_ratio=ratio, layer=recipe.layer))
        model.eval()
        total, tokens = 0.0, 0
        with torch.no_grad():
            for batch in batches:
                labelled = int((batch["labels"][:, 1:] != -100).sum())
                total += float(model(**batch, use_cache=False).loss) * labelled
                tokens += labelled
        runtime = divico.get_runtime(model)
        width = None
        if runtime is not None and runtime.config.method == "divico":
            width = runtime.method.encoder_width(runtime.adapter.hidden_size())
        scores[name] = {"loss": total / tokens, "tokens": tokens, "records": count, "width": width}
        results_path.write_text(json.dumps(results, indent=1))
        print(f"{name}: held-out loss {total / tokens:.4f} over {tokens} tokens", flush=True)
        del model
    print(f"\n| run | g_theta width | held-out LM loss ({count} validation conversations) |")
    print("|---|---|---|")
    for name, row in scores.items():
        print(f"| {name} | {row['width'] if row['width'] is not None else '-'} | {row['loss']:.4f} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    parts = commands.add_parser("parts", help="time DiViCo's compress() and g_theta at 7B sizes per width")
    parts.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parts.add_argument("--widths", type=_int_list, default=[4096, 2048, 1024, 512])
    parts.add_argument("--repeats", type=int, default=15)
    parts.add_argument("--warmup", type=int, default=3)
    parts.add_argument("--threads", type=int, default=None)
    parts.set_defaults(func=run_parts)
    widths = commands.add_parser("widths", help="train DiViCo at several widths on the default model, score each")
    widths.add_argument("--widths", type=_int_list, default=[72, 576])
    widths.add_argument("--seeds", type=_int_list, default=[0])
    widths.add_argument("--steps", type=int, default=90, help="compressor steps (the recipe's 90)")
    widths.add_argument("--data", default=None, help="mini-benchmark folder (default: the demo's)")
    widths.add_argument("--stage2", default=None, help="base stage-2 folder (default: the shipped one)")
    widths.add_argument("--eval-records", type=int, default=None, help="first N validation records (default all)")
    widths.add_argument("--threads", type=int, default=None)
    widths.add_argument("--out", default="runs/divico_widths")
    widths.set_defaults(func=run_widths)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
