"""Tests of divico.analysis.ablation (Fig. 8): ratios on constructed scores, the ablation's ratios recomputed from the
runner's scores.json files on the tiny LLaVA (official POPE fixture), the K scaling rule, and a K sweep that trains
its missing checkpoints (two steps each) and scores them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from fixtures_official import write_benchmark_fixture
from peft import LoraConfig
from PIL import Image
from test_eval_runner import tiny_llava_processor
from test_training import write_color_data
from tiny_models import randomize_compressor, tiny_llava

import divico
from divico.analysis.ablation import (
    FULL,
    VARIANT_A,
    VARIANT_B,
    KSweepTraining,
    ablation_study,
    format_ratio_table,
    k_sweep,
    scaled_layers,
    score_ratios,
)
from divico.evaluation.benchmark import get_benchmark
from divico.lora import inject_lora, lora_target_regex


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_ratios_on_constructed_scores() -> None:
    scores = {VARIANT_A: {"pope": 40.0, "mme": 900.0, "gqa": None},
              VARIANT_B: {"pope": 60.0, "mme": 1500.0, "gqa": 10.0},
              FULL: {"pope": 80.0, "mme": 1200.0, "gqa": 0.0}}
    ratios = score_ratios(scores, FULL)
    assert ratios[VARIANT_A] == {"pope": 0.5, "mme": 0.75, "gqa": None}
    assert ratios[VARIANT_B] == {"pope": 0.75, "mme": 1.25, "gqa": None}  # a reference of 0 gives no ratio
    assert ratios[FULL] == {"pope": 1.0, "mme": 1.0, "gqa": None}
    assert "| w/o disentangled compression (a) | 40.00 (0.500) | 900.00 (0.750) | - |" in \
        format_ratio_table(scores, ratios, ["pope", "mme", "gqa"])
    with pytest.raises(ValueError, match="Reference 'full' is not among"):
        score_ratios(scores, "full")


def test_k_scaling_rule() -> None:
    assert scaled_layers(40) == [2, 7, 19]  # the paper's own depth
    assert scaled_layers(30) == [2, 5, 14]  # SmolLM2-135M (the default model): 1.5 -> 2, 5.25 -> 5, 14.25 -> 14
    assert scaled_layers(32) == [2, 6, 15]  # LLaVA-7B: 1.6, 5.6, 15.2
    assert scaled_layers(4) == [1, 2]  # 0.2 -> at least 1, 0.7 -> 1 (repeat dropped), 1.9 -> 2
    with pytest.raises(ValueError, match="num_layers must be an integer >= 2"):
        scaled_layers(1)


def save_compressor(folder: Path, method: str, encoder: str, seed: int) -> Path:
    model = tiny_llava()
    inject_lora(model, LoraConfig(r=2, lora_alpha=4, target_modules=lora_target_regex(model, None)))
    divico.apply_compression(model, divico.CompressionConfig(method, keep_ratio=0.25, layer=2, encoder=encoder))
    if method == "divico":
        randomize_compressor(model, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    divico.save_compressor(model, folder)
    return folder


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_benchmark_fixture("pope", tmp_path_factory.mktemp("eval"))


def test_ablation_ratios_come_from_the_runner_files(tmp_path: Path, data_root: Path) -> None:
    variants = {VARIANT_A: save_compressor(tmp_path / "a", "fastv", "variational", 1),
                VARIANT_B: save_compressor(tmp_path / "b", "divico", "deterministic", 2)}
    full = save_compressor(tmp_path / "full", "divico", "variational", 3)
    summary = ablation_study(tiny_llava(), tiny_llava_processor(), [get_benchmark("pope")(data_root)],
                             tmp_path / "out", full=full, variants=variants, batch_size=3, max_new_tokens=3,
                             show_progress=False)
    reference = json.loads((tmp_path / "out" / "runs" / FULL / "pope" / "scores.json").read_text())["scores"]["score"]
    for name in (VARIANT_A, VARIANT_B, FULL):
        run = json.loads((tmp_path / "out" / "runs" / name / "pope" / "scores.json").read_text())
        assert run["config"]["lora"] is True
        expected = None if reference == 0 else run["scores"]["score"] / reference
        assert summary["ratios"][name]["pope"] == expected
    assert summary["ratios"][FULL]["pope"] in (1.0, None)
    for file in ("ablation.png", "ablation.json", "ablation_table.md"):
        assert (tmp_path / "out" / file).stat().st_size > 0
    with pytest.raises(FileNotFoundError, match="No trained compressor for 'DiViCo'"):
        ablation_study(tiny_llava(), tiny_llava_processor(), [], tmp_path / "o2", full=tmp_path / "none",
                       variants={})


def test_k_sweep_trains_missing_checkpoints_and_scores_them(tmp_path: Path, data_root: Path) -> None:
    data, images = write_color_data(tmp_path / "train", count=4)
    training = KSweepTraining(data_path=data, image_folder=images, max_steps=2, batch_size=2, lora_r=2)
    model, processor = tiny_llava(), tiny_llava_processor()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    summary = k_sweep(model, processor, [get_benchmark("pope")(data_root)], tmp_path / "out",
                      checkpoints=tmp_path / "ckpt", keep_ratio=0.25, training=training, plot="radar",
                      batch_size=3, max_new_tokens=2, show_progress=False)
    assert summary["layers"] == [1, 2] and summary["trained"] == [1, 2]  # 4 layers: the paper's K scaled
    for k in (1, 2):
        saved = json.loads((tmp_path / "ckpt" / f"divico-k{k}" / "config.json").read_text())
        assert saved["compression"]["layer"] == k and saved["compression"]["method"] == "divico"
        run = json.loads((tmp_path / "out" / "runs" / f"K={k}" / "pope" / "scores.json").read_text())
        assert run["config"]["compression"]["layer"] == k
        assert summary["scores"][f"K={k}"]["pope"] == run["scores"]["score"]
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())  # trained on a copy
    with Image.open(tmp_path / "out" / "ksweep.png") as image:
        assert image.size[0] > 300
    # A second call finds both checkpoints and trains nothing; bars instead of the radar.
    again = k_sweep(model, processor, [get_benchmark("pope")(data_root)], tmp_path / "out2",
                    checkpoints=tmp_path / "ckpt", keep_ratio=0.25, plot="bars", batch_size=3, max_new_tokens=2,
                    show_progress=False)
    assert again["trained"] == [] and again["scores"] == summary["scores"]
    with pytest.raises(FileNotFoundError, match="No checkpoint for K=3"):
        k_sweep(model, processor, [], tmp_path / "o3", checkpoints=tmp_path / "ckpt", layers=[3])
    with pytest.raises(ValueError, match=r"K values must be distinct and in \[1, 3\]"):
        k_sweep(model, processor, [], tmp_path / "o3", checkpoints=tmp_path / "ckpt", layers=[4])
