"""Tiny random-weight InternVL (`InternVLForConditionalGeneration`, Qwen2 text model) and its prompts, for tests.

An image is split by the processor into tiles plus a thumbnail, each a fixed ``TILE`` x ``TILE`` px crop; the model
sees them as rows of ``pixel_values`` (all tiles of the batch, in prompt order) and the prompt as
``<img> <IMG_CONTEXT> x (tiles x TOKENS_PER_TILE) </img>``: one contiguous placeholder run per image. Every tile is
encoded alone and pixel-shuffled (2 x 2 patches -> one token): 16 px / 2 px patches = 8 x 8 patches -> a 4 x 4 grid
of LLM tokens per tile.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig

from tiny_models import FIRST_SPECIAL_ID, IMAGE_TOKEN_ID, PAD_TOKEN_ID, VISION_END_ID, VISION_START_ID, VOCAB_SIZE

TILE = 16  # px per tile side
INTERNVL_PATCH = 2
DOWNSAMPLE_RATIO = 0.5
TOKENS_PER_TILE = int((TILE // INTERNVL_PATCH * DOWNSAMPLE_RATIO) ** 2)  # 16 (a 4 x 4 grid)


def text_ids(count: int, generator: torch.Generator) -> list[int]:
    """``count`` random text ids (below the special ids, never padding)."""
    return torch.randint(1, FIRST_SPECIAL_ID, (count,), generator=generator).tolist()


def left_pad(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    """(B, max length) ``input_ids`` padded on the left with ``PAD_TOKEN_ID`` and the matching ``attention_mask``."""
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), PAD_TOKEN_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, ids in enumerate(rows):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def scale_up(model: torch.nn.Module) -> None:
    """x4 the weight matrices (not embeddings): the std-0.02 init gives near-uniform attention (as tiny_models)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "embed" not in name:
                param.mul_(4.0)


def tiny_internvl(attn: str = "sdpa", seed: int = 0) -> InternVLForConditionalGeneration:
    """InternViT-like tower (1 layer, 32 wide) + Qwen2 text model (4 layers, hidden 64, GQA 4/2)."""
    torch.manual_seed(seed)
    vision = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                  image_size=TILE, patch_size=INTERNVL_PATCH)
    text = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB_SIZE, max_position_embeddings=512,
                pad_token_id=PAD_TOKEN_ID, rms_norm_eps=1e-6, tie_word_embeddings=False)
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
                            downsample_ratio=DOWNSAMPLE_RATIO, vision_feature_layer=-1,
                            vision_feature_select_strategy="default", tie_word_embeddings=False)
    config._attn_implementation = attn
    model = InternVLForConditionalGeneration(config)
    scale_up(model)
    model.set_attn_implementation(attn)
    return model.eval()


def internvl_prompt(tiles_per_image: list[int], before: int, after: int, seed: int) -> dict[str, Any]:
    """Text, then each image as ``<img>`` + its tiles' placeholders + ``</img>`` and one text token, then text.

    ``tiles_per_image`` counts every tile of an image, the thumbnail included (1: thumbnail only).
    """
    generator = torch.Generator().manual_seed(seed)
    ids = text_ids(before, generator)
    for tiles in tiles_per_image:
        ids += [VISION_START_ID] + [IMAGE_TOKEN_ID] * (tiles * TOKENS_PER_TILE) + [VISION_END_ID]
        ids += text_ids(1, generator)
    pixels = torch.randn(sum(tiles_per_image), 3, TILE, TILE, generator=generator)
    return {"ids": ids + text_ids(after, generator), "pixels": pixels, "tiles": list(tiles_per_image)}


def internvl_batch(prompts: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Left-padded ids and mask; ``pixel_values`` (all tiles of the batch, 3, TILE, TILE), stacked as the processor
    does."""
    batch = left_pad([p["ids"] for p in prompts])
    pixels = [p["pixels"] for p in prompts if p["pixels"].shape[0]]
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
    return batch


def internvl_prompts() -> list[dict[str, Any]]:
    """The contract matrix's prompts: an image of 2 tiles + thumbnail (48 tokens) / a thumbnail-only image and one of
    3 + thumbnail (16 + 64 tokens): different tile counts per image and per sample / text only."""
    return [internvl_prompt([3], 4, 5, seed=1), internvl_prompt([1, 4], 2, 4, seed=2),
            internvl_prompt([], 6, 3, seed=3)]


def internvl_accounting() -> list[tuple[dict[str, Any], int, int]]:
    """(spec, tiles, tokens per tile) for the analytic accounting: every tile is a fixed 4 x 4 grid."""
    return [(internvl_prompt([1, 4], 2, 4, seed=2), 5, TOKENS_PER_TILE)]
