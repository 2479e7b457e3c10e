"""Fig. 6's kept-token analysis: the overlay marks exactly the k patches the report kept — the top-k of layer K-1's
eager attention for FastV —, DeCo's pooled cells, and a DeCo compressor leaves the model's projector as it was."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_training import tiny_processor, write_color_data
from tiny_models import randomize_compressor, tiny_llava

import divico
from divico.analysis.common import image_on_grid, load_samples, model_inputs
from divico.analysis.kept import (
    default_configurations,
    kept_analysis,
    kept_overlay,
    kept_patches,
    pooled_mosaic,
    summarize,
)
from divico.evaluation.runner import EvalConfiguration, configured


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("keep", [1, 7, 20])
def test_overlay_marks_exactly_the_k_patches_of_layer_k_minus_1_attention(tmp_path: Path, keep: int) -> None:
    data, images = write_color_data(tmp_path, count=2)
    sample = load_samples(data=data, image_folder=images)[1]
    processor = tiny_processor()
    model = tiny_llava()
    inputs = model_inputs(model, processor, sample)
    visual = (inputs["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0]
    with torch.no_grad():  # eager attention of the last prompt token at layer K-1 = 1, computed by transformers
        eager = tiny_llava(attn_implementation="eager")(**inputs, output_attentions=True).attentions[1]
    expected_cells = set(eager[0, :, -1, visual].mean(0).topk(keep).indices.tolist())
    with divico.compressed(model, divico.CompressionConfig("fastv", keep_tokens=keep, layer=2)):
        patches = kept_patches(model, inputs, "fastv")
    assert patches.num_kept == keep and int(patches.kept.sum()) == keep
    assert set(np.flatnonzero(patches.kept).tolist()) == expected_cells
    white = np.full((8 * 4, 8 * 4, 3), 255, np.uint8)  # 4 px per cell
    drawn = kept_overlay(white, patches.kept, dim=0.5)
    cells = drawn.reshape(8, 4, 8, 4, 3).transpose(0, 2, 1, 3, 4).reshape(64, -1)
    untouched = (cells == 255).all(axis=1)
    assert int(untouched.sum()) == keep
    assert set(np.flatnonzero(untouched).tolist()) == expected_cells
    assert (cells[~untouched] == 128).all()  # 255 * 0.5 rounded


def test_overlay_refuses_bad_dim_and_sizes() -> None:
    with pytest.raises(ValueError, match=r"dim must be in \[0, 1\), got 1.5"):
        kept_overlay(np.zeros((8, 8, 3), np.uint8), np.ones((2, 2), bool), dim=1.5)
    with pytest.raises(ValueError, match="does not divide into the 3x3 patch grid"):
        kept_overlay(np.zeros((8, 8, 3), np.uint8), np.ones((3, 3), bool))


def test_pooled_mosaic_averages_each_window() -> None:
    image = np.zeros((4, 4, 3), np.uint8)
    image[:2, :2], image[:2, 2:], image[2:, :2], image[2:, 2:] = 40, 80, 120, 200
    assert (pooled_mosaic(image, (2, 2)) == image).all()
    assert (pooled_mosaic(image, (1, 1)) == 110).all()  # (40 + 80 + 120 + 200) / 4


def test_kept_analysis_fastv_divico_deco(tmp_path: Path) -> None:
    data, images = write_color_data(tmp_path, count=3)
    samples = load_samples(data=data, image_folder=images)
    model = tiny_llava()
    processor = tiny_processor()
    result = kept_analysis(model, processor, samples, default_configurations(0.25, 2), show_progress=False)
    for entries in result.values():
        fastv, divico_entry, deco = entries
        assert [e.label for e in entries] == ["fastv@0.25", "divico@0.25", "deco@0.25"]
        assert int(fastv.kept.sum()) == int(divico_entry.kept.sum()) == 16
        # An untrained DiViCo scores with the same q/k as FastV: the same selection.
        assert (fastv.kept == divico_entry.kept).all()
        assert deco.kept is None and deco.pooled == (4, 4) and deco.num_kept == 16
        assert image_on_grid(samples[0].image, fastv.grid).shape == (8 * 16, 8 * 16, 3)
    summary = summarize(result)
    assert summary["mean_jaccard"] == {"fastv@0.25 vs divico@0.25": 1.0}
    assert len(summary["per_sample"]["s0"]["configurations"][0]["kept_cells"]) == 16


def test_deco_compressor_leaves_the_projector_as_it_was(tmp_path: Path) -> None:
    model = tiny_llava()
    projector = divico.registry.get_adapter(model).projector()
    stock = {k: v.clone() for k, v in projector.state_dict().items()}
    with divico.compressed(model, divico.CompressionConfig("deco", keep_tokens=16)):
        randomize_compressor(model)  # perturbs the projector in place, as training DeCo does
        divico.save_compressor(model, tmp_path / "deco")
    projector.load_state_dict(stock)
    configuration = EvalConfiguration("deco", compressor=tmp_path / "deco")
    with configured(model, configuration):
        assert not torch.equal(projector.state_dict()["linear_1.weight"], stock["linear_1.weight"])
    for key, value in projector.state_dict().items():
        assert torch.equal(value, stock[key]), key
