"""Fig. 1's attention analysis: the engine's last-token attention equals eager ``output_attentions``, the maps are
that attention at the image's patches, and the concentration numbers match values computed by hand."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from test_training import tiny_processor, write_color_data
from tiny_models import TOKENS_PER_IMAGE, llava_batch, llava_prompt, tiny_llava

import divico
from divico.analysis.attention import (
    attention_analysis,
    concentration,
    default_layers,
    last_token_attention,
)
from divico.analysis.common import load_samples, model_inputs


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def eager_last_row(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """(B, N) per layer: transformers' own eager attention weights of the last position, mean over heads."""
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    return [layer[:, :, -1, :].mean(dim=1) for layer in attentions]


def test_default_layers_follow_the_paper() -> None:
    assert default_layers(32) == [0, 2, 15, 25]  # Fig. 1 of LLaVA-1.5-7B
    assert default_layers(30) == [0, 2, 14, 23]
    assert default_layers(4) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="num_layers must be >= 1, got 0"):
        default_layers(0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_last_token_attention_equals_eager_attention(attn: str) -> None:
    reference_model = tiny_llava(attn_implementation="eager")
    model = tiny_llava(attn_implementation=attn)  # same seed: same weights, another attention kernel
    # Batch 2 with left padding: the shorter prompt's padding gets 0.
    inputs = llava_batch([llava_prompt(1, 3, 5, seed=0), llava_prompt(1, 6, 9, seed=1)])
    ours = last_token_attention(model, inputs, [0, 1, 2, 3])
    for layer, reference in enumerate(eager_last_row(reference_model, inputs)):
        assert torch.allclose(ours[layer], reference, atol=1e-6), layer
    assert float(ours[2][0, :3].abs().max()) == 0.0  # the three padding positions of the shorter prompt
    assert torch.allclose(ours[3].sum(dim=1), torch.ones(2), atol=1e-5)


def test_last_token_attention_refuses_bad_layers_and_compressed_models() -> None:
    model = tiny_llava()
    inputs = llava_batch([llava_prompt(1, 3, 5, seed=0)])
    with pytest.raises(ValueError, match=r"integers in \[0, 3\], got \[4\]"):
        last_token_attention(model, inputs, [4])
    with divico.compressed(model, divico.CompressionConfig("fastv", keep_ratio=0.25)):
        with pytest.raises(ValueError, match="needs the stock model"):
            last_token_attention(model, inputs, [0])


def test_concentration_by_hand() -> None:
    # p = (1/2, 1/4, 1/8, 1/8): H = 1.75 ln 2, H / ln 4 = 0.875; top 25% of 4 tokens = 1 token = 1/2.
    numbers = concentration(torch.tensor([0.5, 0.25, 0.125, 0.125]), top_ratio=0.25)
    assert numbers["normalized_entropy"] == pytest.approx(0.875, abs=1e-12)
    assert numbers["top_share"] == pytest.approx(0.5, abs=1e-12)
    assert numbers["uniform_top_share"] == 0.25 and numbers["visual_mass"] == pytest.approx(1.0)
    # Uniform attention holding 40% of the row: entropy 1, top share = k / Nv, mass 0.4.
    uniform = concentration(torch.full((10,), 0.04), top_ratio=0.2)
    assert uniform["normalized_entropy"] == pytest.approx(1.0, abs=1e-12)
    assert uniform["top_share"] == pytest.approx(0.2) and uniform["visual_mass"] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="at least 2 visual tokens, got 1"):
        concentration(torch.tensor([1.0]), 0.5)
    with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\], got 0.0"):
        concentration(torch.ones(4), 0.0)


def test_attention_analysis_maps_and_curve_are_eager_attention(tmp_path: Path) -> None:
    data, images = write_color_data(tmp_path, count=3)
    samples = load_samples(data=data, image_folder=images)
    processor = tiny_processor()
    model = tiny_llava()
    reference_model = tiny_llava(attn_implementation="eager")
    result = attention_analysis(model, processor, samples, layers=[0, 2], num_maps=2, top_ratio=0.25,
                                show_progress=False)
    assert result.layers == [0, 2] and list(result.maps) == ["s0", "s1"] and len(result.per_prompt) == 3
    entropies = []
    for sample in samples:
        inputs = model_inputs(model, processor, sample)
        visual = (inputs["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0]
        assert visual.numel() == TOKENS_PER_IMAGE
        rows = eager_last_row(reference_model, inputs)
        if sample.sample_id in result.maps:
            for layer in (0, 2):
                expected = rows[layer][0, visual].reshape(8, 8).numpy()
                assert result.maps[sample.sample_id][layer] == pytest.approx(expected, abs=1e-6)
        p = rows[3][0, visual].double()
        p = p / p.sum()
        entropies.append(float(-(p * p.log()).sum()) / math.log(TOKENS_PER_IMAGE))
        top = float(p.topk(16).values.sum())
        assert result.per_prompt[sample.sample_id][3]["top_share"] == pytest.approx(top, abs=1e-5)
    assert result.curve["normalized_entropy"]["mean"][3] == pytest.approx(sum(entropies) / 3, abs=1e-6)
    assert len(result.curve["top_share"]["mean"]) == 4
