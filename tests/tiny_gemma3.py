"""A tiny random-weight `Gemma3ForConditionalGeneration` (real transformers classes) and its inputs, for tests.

Layout: 16 px images, 2 px SigLIP patches -> an 8 x 8 patch grid that Gemma 3's projector average-pools (2 x 2) to
a 4 x 4 grid of 16 LLM tokens per image, each image written as ``<boi> 16 x <image> <eoi>``. Four text layers
[sliding, full, sliding, full] with an 8-token window (shorter than every compressed sequence of the contract
prompts) and different RoPE bases per layer type (100 for sliding, 10000 for full), so layer K-1 (full) and K
(sliding) use different tables; ``query_pre_attn_scalar`` differs from ``head_dim`` so a scorer using the default
``head_dim ** -0.5`` scaling is caught.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

import divico.adapters.gemma3  # noqa: F401  (registers the adapter, until divico.adapters imports the module)
from tiny_models import (
    FIRST_SPECIAL_ID,
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    VISION_END_ID,
    VISION_START_ID,
    VOCAB_SIZE,
)

GEMMA3_IMAGE_SIZE = 16
GEMMA3_PATCH = 2
GEMMA3_TOKENS_PER_IMAGE = 16  # 4 x 4 after the projector's 2 x 2 average pool of the 8 x 8 patch grid
GEMMA3_SLIDING_WINDOW = 8
GEMMA3_LAYER_TYPES = ("sliding_attention", "full_attention", "sliding_attention", "full_attention")
GEMMA3_ROPE_THETA = {"sliding_attention": 100.0, "full_attention": 10000.0}


def _left_pad(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    """(B, max length) ``input_ids`` left-padded with ``PAD_TOKEN_ID`` and the matching ``attention_mask``."""
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), PAD_TOKEN_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, ids in enumerate(rows):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def tiny_gemma3_config(attn: str = "sdpa") -> Gemma3Config:
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=GEMMA3_IMAGE_SIZE, patch_size=GEMMA3_PATCH, vision_use_head=False)
    text = Gemma3TextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=len(GEMMA3_LAYER_TYPES), num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=32, vocab_size=VOCAB_SIZE,
        max_position_embeddings=512, pad_token_id=PAD_TOKEN_ID, rms_norm_eps=1e-6, tie_word_embeddings=False,
        sliding_window=GEMMA3_SLIDING_WINDOW, layer_types=list(GEMMA3_LAYER_TYPES),
        rope_parameters={kind: {"rope_type": "default", "rope_theta": theta} for kind, theta in GEMMA3_ROPE_THETA.items()},
    )
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=GEMMA3_TOKENS_PER_IMAGE,
                          image_token_index=IMAGE_TOKEN_ID, boi_token_index=VISION_START_ID,
                          eoi_token_index=VISION_END_ID, tie_word_embeddings=False)
    config._attn_implementation = attn
    return config


def tiny_gemma3(attn: str = "sdpa", seed: int = 0) -> Gemma3ForConditionalGeneration:
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(tiny_gemma3_config(attn))
    with torch.no_grad():
        # Std-0.02 init gives near-uniform attention: scale the matrices up (x4) so selection matters.
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "embed" not in name:
                param.mul_(4.0)
        # Gemma 3 initialises its projection to zeros: every image token would be the same vector.
        projection = model.model.multi_modal_projector.mm_input_projection_weight
        projection.copy_(torch.randn(projection.shape, generator=torch.Generator().manual_seed(seed + 7)) * 0.5)
    model.set_attn_implementation(attn)
    return model.eval()


def gemma3_prompt(num_images: int, before: int, after: int, seed: int) -> dict[str, Any]:
    """Text, then each image as ``<boi> 16 x <image> <eoi>`` followed by one text token, then text; with pixels."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, FIRST_SPECIAL_ID, (before,), generator=generator).tolist()
    for _ in range(num_images):
        ids += [VISION_START_ID] + [IMAGE_TOKEN_ID] * GEMMA3_TOKENS_PER_IMAGE + [VISION_END_ID]
        ids += torch.randint(1, FIRST_SPECIAL_ID, (1,), generator=generator).tolist()
    ids += torch.randint(1, FIRST_SPECIAL_ID, (after,), generator=generator).tolist()
    pixels = torch.randn(num_images, 3, GEMMA3_IMAGE_SIZE, GEMMA3_IMAGE_SIZE, generator=generator)
    return {"ids": ids, "pixels": pixels}


def gemma3_batch(prompts: list[dict[str, Any]], token_type_ids: bool = True) -> dict[str, torch.Tensor]:
    """Left-padded batch as the Gemma 3 processor builds it: ids, mask, ``token_type_ids`` (1 at image tokens;
    they make each image's tokens attend to each other bidirectionally) and pixels."""
    batch = _left_pad([p["ids"] for p in prompts])
    if token_type_ids:
        batch["token_type_ids"] = (batch["input_ids"] == IMAGE_TOKEN_ID).long()
    pixels = [p["pixels"] for p in prompts if p["pixels"].shape[0]]
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
    return batch


def gemma3_prompts() -> list[dict[str, Any]]:
    """One image (28 tokens) / two images (45) / text only (9): compressed at keep 1/4 to 16 and 21 tokens, both
    longer than the 8-token sliding window."""
    return [gemma3_prompt(1, 4, 6, seed=1), gemma3_prompt(2, 3, 4, seed=2), gemma3_prompt(0, 5, 4, seed=3)]
