"""Tiny random-weight Idefics3 and SmolVLM models (Llama text model) and prompts laid out as their processor does.

An image is split into ``rows x cols`` tiles plus a global image, each ``image_seq_len`` placeholders; the prompt
of a split image is, as in ``Idefics3Processor`` / ``SmolVLMProcessor``::

    for each row: for each col: <fake_token_around_image> <row_r_col_c> <image> x seq   then "\\n" after the row
    "\\n" <fake_token_around_image> <global-img> <image> x seq <fake_token_around_image>

(an unsplit image is only the global part), so the row/column markers split an image's tokens into one run per
tile. ``pixel_values`` is (B, max tiles, 3, S, S), padded with all-zero images; ``pixel_attention_mask`` marks the
real pixels. Idefics3: 16 px tiles / 2 px patches / scale 2 -> a 4 x 4 token grid; SmolVLM: 24 px / 2 px / scale 3
-> 4 x 4.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3VisionConfig,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMVisionConfig,
)

from tiny_internvl import left_pad, scale_up, text_ids
from tiny_models import IMAGE_TOKEN_ID, PAD_TOKEN_ID, VISION_END_ID, VISION_START_ID, VOCAB_SIZE

FAKE_AROUND_IMAGE_ID = VISION_START_ID  # <fake_token_around_image>
GLOBAL_IMAGE_ID = VISION_END_ID  # <global-img>
NEWLINE_ID = 10  # "\n"
FIRST_MARKER_ID = 100  # <row_r_col_c> = FIRST_MARKER_ID + 4 * (r - 1) + (c - 1) (text ids; up to 4 x 4 tiles)

#: kind -> (config class, vision config class, model class, tile px, patch px, scale_factor)
KINDS = {
    "idefics3": (Idefics3Config, Idefics3VisionConfig, Idefics3ForConditionalGeneration, 16, 2, 2),
    "smolvlm": (SmolVLMConfig, SmolVLMVisionConfig, SmolVLMForConditionalGeneration, 24, 2, 3),
}
TOKENS_PER_TILE = 16  # both kinds: a 4 x 4 token grid per tile


def tile_px(kind: str) -> int:
    """Side of one tile (and of the global image) in pixels."""
    return KINDS[kind][3]


def tiny_idefics3(kind: str = "idefics3", attn: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """SigLIP-like tower (1 layer, 32 wide) + Llama text model (4 layers, hidden 64, GQA 4/2)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    config_class, vision_class, model_class, tile, patch, scale = KINDS[kind]
    torch.manual_seed(seed)
    vision = vision_class(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                          image_size=tile, patch_size=patch)
    text = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB_SIZE, max_position_embeddings=512,
                pad_token_id=PAD_TOKEN_ID, rms_norm_eps=1e-6, tie_word_embeddings=False)
    config = config_class(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID, scale_factor=scale,
                          tie_word_embeddings=False)
    config._attn_implementation = attn
    model = model_class(config)
    scale_up(model)
    model.set_attn_implementation(attn)
    return model.eval()


def image_ids(rows: int, cols: int) -> list[int]:
    """Placeholder layout of one image split into ``rows x cols`` tiles (0 x 0: not split) plus its global image."""
    seq = [IMAGE_TOKEN_ID] * TOKENS_PER_TILE
    ids: list[int] = []
    for row in range(rows):
        for col in range(cols):
            ids += [FAKE_AROUND_IMAGE_ID, FIRST_MARKER_ID + 4 * row + col] + seq
        ids += [NEWLINE_ID]
    if rows:
        ids += [NEWLINE_ID]
    return ids + [FAKE_AROUND_IMAGE_ID, GLOBAL_IMAGE_ID] + seq + [FAKE_AROUND_IMAGE_ID]


def idefics3_prompt(kind: str, splits: list[tuple[int, int]], before: int, after: int, seed: int) -> dict[str, Any]:
    """Text, then each image (``(rows, cols)`` tiles; ``(0, 0)`` unsplit) and one text token, then text."""
    generator = torch.Generator().manual_seed(seed)
    ids = text_ids(before, generator)
    for rows, cols in splits:
        ids += image_ids(rows, cols) + text_ids(1, generator)
    tiles = sum(rows * cols + 1 for rows, cols in splits)
    size = tile_px(kind)
    pixels = torch.randn(tiles, 3, size, size, generator=generator)
    return {"ids": ids + text_ids(after, generator), "pixels": pixels, "kind": kind}


def idefics3_batch(prompts: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Left-padded ids and mask; ``pixel_values`` (B, max tiles, 3, S, S) zero-padded, ``pixel_attention_mask``."""
    batch = left_pad([p["ids"] for p in prompts])
    most = max(p["pixels"].shape[0] for p in prompts)
    if most:
        size = tile_px(prompts[0]["kind"])
        pixels = torch.zeros(len(prompts), most, 3, size, size)
        mask = torch.zeros(len(prompts), most, size, size, dtype=torch.bool)
        for row, p in enumerate(prompts):
            count = p["pixels"].shape[0]
            pixels[row, :count] = p["pixels"]
            mask[row, :count] = True
        batch["pixel_values"] = pixels
        batch["pixel_attention_mask"] = mask
    return batch


def idefics3_prompts(kind: str) -> list[dict[str, Any]]:
    """The contract matrix's prompts: an image split 1 x 2 (3 tiles, 48 tokens) / an unsplit image and one split
    2 x 1 (4 tiles, 64 tokens) / text only (all-zero padded images in a batch)."""
    return [idefics3_prompt(kind, [(1, 2)], 4, 5, seed=1), idefics3_prompt(kind, [(0, 0), (2, 1)], 2, 4, seed=2),
            idefics3_prompt(kind, [], 6, 3, seed=3)]


def idefics3_accounting(kind: str) -> list[tuple[dict[str, Any], int, int]]:
    """(spec, tiles, tokens per tile) for the analytic accounting: every tile is a fixed 4 x 4 grid."""
    return [(idefics3_prompt(kind, [(0, 0), (2, 1)], 2, 4, seed=2), 4, TOKENS_PER_TILE)]
