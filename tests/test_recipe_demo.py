"""Default-model recipe pieces (LoRA merge, export) and the demo's tables on hand-made results."""

from __future__ import annotations

import json

import pytest
import torch

import divico
from divico.demo import format_table1, format_table3, relative_improvement
from divico.zoo.recipe import RecipeConfig, compressor_runs, export_assets, merge_lora
from tiny_models import sample, tiny_llava


def test_merge_lora_keeps_outputs_and_removes_lora_modules():
    peft = pytest.importorskip("peft")
    model = tiny_llava(seed=0)
    peft.inject_adapter_in_model(
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)"), model
    )
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        with_lora = model(**sample()).logits
        merge_lora(model)
        merged = model(**sample()).logits
    assert not any("lora" in name for name, _ in model.named_parameters())
    torch.testing.assert_close(merged, with_lora, atol=1e-5, rtol=1e-5)


def test_recipe_runs_cover_paper_rates_and_ablations():
    runs = compressor_runs(RecipeConfig())
    keep = {name: cfg.keep_ratio for name, cfg in runs.items()}
    assert keep["divico-keep16.7"] == pytest.approx(1 / 6)
    assert keep["deco-keep6.7"] == pytest.approx(1 / 15)
    assert runs["variant_a-keep11.1"].method == "fastv"
    assert runs["variant_b-keep11.1"].encoder == "deterministic"
    assert RecipeConfig().scaled(2.0).stage2_steps == 2 * RecipeConfig().stage2_steps
    with pytest.raises(ValueError, match="steps scale must be > 0"):
        RecipeConfig().scaled(0)


def test_export_copies_trained_parts_only(tmp_path):
    stage = tmp_path / "run" / "compressors" / "divico-keep11.1"
    (stage / "checkpoints" / "checkpoint-10").mkdir(parents=True)
    (stage / "checkpoints" / "checkpoint-10" / "optimizer.pt").write_bytes(b"x")
    (stage / "lora").mkdir()
    (stage / "lora" / "adapter_model.safetensors").write_bytes(b"w")
    for name in ("config.json", "training_config.json", "compressor.safetensors"):
        (stage / name).write_text("{}")
    unfinished = tmp_path / "run" / "compressors" / "deco-keep6.7"
    unfinished.mkdir(parents=True)
    (unfinished / "config.json").write_text("{}")
    target = export_assets(tmp_path / "run", tmp_path / "assets")
    files = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    assert files == ["compressors/divico-keep11.1/compressor.safetensors", "compressors/divico-keep11.1/config.json",
                     "compressors/divico-keep11.1/lora/adapter_model.safetensors",
                     "compressors/divico-keep11.1/training_config.json"]


def _row(method, tag, scores, kept, flops, memory, seconds):
    return {"method": method, "tag": tag, "scores": scores,
            "efficiency": {"visual_tokens": 144, "kept_tokens": kept, "flops": flops, "peak_memory_bytes": memory,
                           "prefill_seconds": seconds}}


def test_tables_compute_improvement_and_ratios_by_hand():
    benchmarks = ("textvqa", "pope")
    results = {
        "baseline": _row("baseline", None, {"textvqa": 50.0, "pope": 80.0}, 144, 40e9, 400 * 2**20, 0.200),
        "fastv-keep11.1": _row("fastv", "keep11.1", {"textvqa": 40.0, "pope": 70.0}, 16, 10e9, 200 * 2**20, 0.100),
        "deco-keep11.1": _row("deco", "keep11.1", {"textvqa": 44.0, "pope": 60.0}, 16, 8e9, 180 * 2**20, 0.080),
        "divico-keep11.1": _row("divico", "keep11.1", {"textvqa": 46.2, "pope": 63.0}, 16, 11e9, 210 * 2**20, 0.110),
    }
    assert relative_improvement(46.2, 44.0) == pytest.approx(5.0)
    table1 = format_table1(results, benchmarks)
    # textvqa: (46.2 - 44) / 44 = +5.0 %; pope: (63 - 70) / 70 = -10.0 %
    assert "| 88.9% | Improvement | +5.0% | -10.0% |" in table1
    assert "| 88.9% | DiViCo | 46.2 | 63.0 |" in table1
    table3 = format_table3(results)
    # FLOPs 11 vs 40 G: -72.5 %; memory 210 vs 400 MB: -47.5 %; time 110 vs 200 ms: -45.0 %; accuracy -7.6 %
    assert "| Δ ratio | | -7.6% | -72.5% | -47.5% | -45.0% |" in table3
    assert "| DiViCo @88.9% compr. | 16/144 | 46.2 | 11.0 | 210 | 110 |" in table3


def test_finished_stages_reopen_for_more_steps_or_a_new_base(tmp_path):
    from divico.zoo.recipe import _finished

    stage = tmp_path / "stage"
    (stage / "checkpoints" / "checkpoint-30").mkdir(parents=True)
    (stage / "config.json").write_text("{}")
    (stage / "training_config.json").write_text(json.dumps({"max_steps": 30}))
    (stage / "recipe_base.json").write_text(json.dumps({"stage2_steps": 550}))
    assert _finished(stage, 30, {"stage2_steps": 550})
    assert _finished(stage, 20, {"stage2_steps": 550})
    assert not _finished(stage, 60, {"stage2_steps": 550})  # more steps asked: resume from the checkpoint
    assert (stage / "checkpoints" / "checkpoint-30").is_dir() and not (stage / "config.json").exists()
    (stage / "config.json").write_text("{}")
    (stage / "training_config.json").write_text(json.dumps({"max_steps": 30}))
    assert not _finished(stage, 30, {"stage2_steps": 1000})  # the base changed: start over
    assert not (stage / "checkpoints").exists()
