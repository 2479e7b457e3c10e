"""Tiny random-weight Qwen3-VL (`Qwen3VLForConditionalGeneration`, and the MoE class) and its prompts, for tests.

4 text layers (hidden 64, GQA 4/2, head_dim 16, interleaved mRoPE sections 4/2/2 of its 8 frequencies, per-head
q/k norms); a 3-block vision tower whose every block feeds one DeepStack level, so DeepStack features are added
after text layers 0, 1 and 2: with K = 2 the last addition lands on the compressed sequence.

Inputs are in the exact format of ``Qwen3VLProcessor`` (whose tokenizer cannot be built offline): ``input_ids``,
``attention_mask``, ``mm_token_type_ids`` (0 text, 1 image, 2 video), ``pixel_values`` / ``image_grid_thw`` and
``pixel_values_videos`` / ``video_grid_thw`` (rows of flattened 2 x 2 x 2 patches, as :func:`tiny_models.qwen_item`
makes them). An image is ``<vision_start> <image_pad> x (h * w / 4) <vision_end>``; a video of t temporal patches
is, per frame, ``<timestamp text> <vision_start> <video_pad> x (h * w / 4) <vision_end>`` (the processor's
``replace_video_token``): every frame is its own placeholder run.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)

from tiny_models import (
    FIRST_SPECIAL_ID,
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    QWEN_MERGE,
    QWEN_PATCH,
    QWEN_TEMPORAL,
    VIDEO_TOKEN_ID,
    VISION_END_ID,
    VISION_START_ID,
    VOCAB_SIZE,
    qwen_item,
)

QWEN3_NUM_LAYERS = 4
DEEPSTACK_LEVELS = 3  # added after text layers 0, 1, 2
TIMESTAMP_TOKENS = 2  # text ids standing for "<0.5 seconds>" before every video frame


def _text_ids(count: int, generator: torch.Generator) -> list[int]:
    return torch.randint(1, FIRST_SPECIAL_ID, (count,), generator=generator).tolist()


def tiny_qwen3_vl(attn: str = "sdpa", seed: int = 0, moe: bool = False) -> torch.nn.Module:
    """A tiny Qwen3-VL (``moe=True``: Qwen3-VL-MoE, 4 experts, top-2) with weights scaled up x4 from the init."""
    torch.manual_seed(seed)
    text: dict[str, Any] = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=QWEN3_NUM_LAYERS, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=VOCAB_SIZE, max_position_embeddings=512,
        pad_token_id=PAD_TOKEN_ID, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                         "mrope_interleaved": True},
    )
    vision = dict(depth=DEEPSTACK_LEVELS, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=QWEN_PATCH,
                  temporal_patch_size=QWEN_TEMPORAL, spatial_merge_size=QWEN_MERGE, out_hidden_size=64,
                  num_position_embeddings=64, deepstack_visual_indexes=list(range(DEEPSTACK_LEVELS)))
    if moe:
        text.update(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
        config_class, model_class = Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration
    else:
        config_class, model_class = Qwen3VLConfig, Qwen3VLForConditionalGeneration
    config = config_class(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN_ID,
                          video_token_id=VIDEO_TOKEN_ID, vision_start_token_id=VISION_START_ID,
                          vision_end_token_id=VISION_END_ID, tie_word_embeddings=False)
    config._attn_implementation = attn
    model = model_class(config)
    with torch.no_grad():  # std-0.02 init gives near-uniform attention: scale so selection matters
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "embed" not in name:
                param.mul_(4.0)
    model.set_attn_implementation(attn)
    return model.eval()


def qwen3_prompt(items: list[dict[str, Any]], before: int, after: int, seed: int) -> dict[str, Any]:
    """Text, then each item (see the module docstring) and one text token, then text.

    ``items`` are :func:`tiny_models.qwen_item` dicts (an image has t = 1; a video t temporal patches).
    """
    generator = torch.Generator().manual_seed(seed)
    ids = _text_ids(before, generator)
    for item in items:
        t, h, w = item["thw"]
        frame = h * w // QWEN_MERGE**2
        if item["kind"] == "image":
            ids += [VISION_START_ID] + [IMAGE_TOKEN_ID] * (t * frame) + [VISION_END_ID]
        else:
            for _ in range(t):
                ids += _text_ids(TIMESTAMP_TOKENS, generator) + [VISION_START_ID] + [VIDEO_TOKEN_ID] * frame
                ids += [VISION_END_ID]
        ids += _text_ids(1, generator)
    return dict(ids=ids + _text_ids(after, generator), items=items)


def qwen3_contract_prompts() -> list[dict[str, Any]]:
    """The contract matrix's prompts: a 16-token image / a 12-token image and a 2-frame video (2 x 8 tokens, each
    frame its own run) / text only."""
    return [qwen3_prompt([qwen_item("image", 1, 8, 8, seed=1)], 4, 20, seed=1),
            qwen3_prompt([qwen_item("image", 1, 4, 12, seed=2), qwen_item("video", 2, 4, 8, seed=3)], 2, 12, seed=2),
            qwen3_prompt([], 6, 4, seed=3)]
