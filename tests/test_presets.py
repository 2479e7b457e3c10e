"""`divico bench` presets shaped like real models: their sizes agree with the published parameter counts.

A preset is a LLaVA construction (CLIP-layer vision tower, MLP projector, Llama-layer LLM) with the real model's
shapes (src/divico/efficiency/presets.py). Counting its parameters on the meta device (no memory) checks the shapes
against the one number every model card publishes: a wrong width, depth, head count, vocabulary or embedding tying
moves the count by far more than the 2% the stand-in layers account for.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from divico.efficiency import PromptShape, build_config, count_flops, preset_names
from divico.efficiency.presets import PRESETS

REAL_SHAPED = sorted(name for name, preset in PRESETS.items() if preset.published_parameters_b is not None)


def _parameters(name: str) -> int:
    """Distinct parameters of the full-depth preset model (tied embeddings once), built on the meta device."""
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(build_config(name))
    return sum(param.numel() for param in model.parameters())


def test_the_issue_models_have_presets():
    for name in ("llava-onevision-7b", "qwen2.5-vl-7b", "qwen3-vl-8b", "internvl3-8b", "gemma-3-4b", "gemma-3-12b",
                 "smolvlm2-2.2b"):
        assert name in preset_names() and name in REAL_SHAPED
        assert PRESETS[name].source  # the hub repository the shapes come from


@pytest.mark.parametrize("name", REAL_SHAPED)
def test_parameter_count_is_within_two_percent_of_the_published_size(name):
    published = PRESETS[name].published_parameters_b * 1e9
    assert _parameters(name) == pytest.approx(published, rel=0.02)


def test_gemma_head_dim_and_tied_embeddings_reach_the_model_and_the_flops():
    """Gemma 3 4B: 8 query heads x 256 = 2048 features (not hidden / heads = 320), one shared embedding matrix."""
    config = build_config("gemma-3-4b", layers=1)
    prompt = PromptShape(visual_tokens=256, text_tokens=60)
    layer = count_flops(config, prompt).llm_layers[0]
    assert layer.projections == 2 * 316 * 2560 * (2 * 8 * 256 + 2 * 4 * 256)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert model.model.language_model.layers[0].self_attn.q_proj.weight.shape == (2048, 2560)


@pytest.mark.parametrize(("name", "tokens"), [("llava-onevision-7b", 729), ("internvl3-8b", 256),
                                              ("gemma-3-4b", 256), ("smolvlm2-2.2b", 81)])
def test_one_preset_image_gives_the_real_models_llm_tokens_per_image(name, tokens):
    """729 = a 27 x 27 SigLIP grid at 384 px; 256 = InternVL's 448 px tile after the pixel shuffle (32 x 32 / 4) and
    Gemma 3's pooled 896 px image (64 x 64 / 16); 81 = SmolVLM2's 384 px tile after a 3 x 3 shuffle (27 x 27 / 9)."""
    vision = build_config(name).vision_config
    assert (vision.image_size // vision.patch_size) ** 2 == tokens
