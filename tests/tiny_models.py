"""Tiny random-weight models of every supported family, and their inputs, for tests (real transformers classes).

Each builder seeds torch, so two calls with the same seed give the same weights whatever the attention
implementation: an ``sdpa`` and an ``eager`` model of one family differ only in their attention kernels.
Weights are scaled up (x4) from the std-0.02 init so attention is far from uniform and selection matters.

A *prompt spec* is a dict with the token ids of one sample and its visual inputs; ``*_batch(specs)`` left-pads a
list of specs into model inputs, so a sample alone and inside a batch get the very same images.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
)

# Shared by every family: ids < FIRST_SPECIAL_ID are text; 120.. are image / video / vision start / end tokens.
VOCAB_SIZE = 128
PAD_TOKEN_ID = 0
FIRST_SPECIAL_ID = 120
IMAGE_TOKEN_ID = 120
VIDEO_TOKEN_ID = 121
VISION_START_ID = 122
VISION_END_ID = 123

# LLaVA: 32 px images, 4 px patches -> an 8 x 8 grid, CLS dropped by the "default" strategy.
IMAGE_SIZE = 32
PATCH_SIZE = 4
TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 64

# Qwen2-VL / Qwen2.5-VL: 2 x 2 patches merge into one LLM token; 2 frames per temporal patch.
QWEN_MERGE, QWEN_PATCH, QWEN_TEMPORAL = 2, 2, 2
QWEN_PATCH_DIM = 3 * QWEN_TEMPORAL * QWEN_PATCH * QWEN_PATCH

# Video-LLaVA: 16 px images, 4 px patches -> 16 image tokens (CLS dropped); a video frame keeps CLS (17 tokens).
VIDEO_LLAVA_IMAGE_SIZE = 16
VIDEO_LLAVA_PATCH = 4
VIDEO_LLAVA_PATCHES = (VIDEO_LLAVA_IMAGE_SIZE // VIDEO_LLAVA_PATCH) ** 2  # 16
VIDEO_LLAVA_FRAMES = 4


def _text_ids(n: int, generator: torch.Generator) -> list[int]:
    return torch.randint(1, FIRST_SPECIAL_ID, (n,), generator=generator).tolist()


def _scale_up(model: torch.nn.Module) -> None:
    """Std-0.02 init gives near-uniform attention: scale the weight matrices so selection matters."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "embed" not in name:
                param.mul_(4.0)


def _left_pad(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), PAD_TOKEN_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, ids in enumerate(rows):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


# --- LLaVA ----------------------------------------------------------------------------------------------------
def tiny_llava_config(num_layers: int = 4, attn_implementation: str = "sdpa") -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=32,
    )
    text = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB_SIZE, max_position_embeddings=512, pad_token_id=PAD_TOKEN_ID,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
        vision_feature_select_strategy="default", vision_feature_layer=-1, projector_hidden_act="gelu",
    )
    config._attn_implementation = attn_implementation
    return config


def tiny_llava(seed: int = 0, num_layers: int = 4, attn_implementation: str = "sdpa") -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    config = tiny_llava_config(num_layers, attn_implementation)
    model = LlavaForConditionalGeneration(config)
    _scale_up(model)
    model.set_attn_implementation(attn_implementation)
    return model.eval()


def prompt_ids(num_images: int, text_before: int, text_after: int, seed: int) -> list[int]:
    """Token ids: text, then ``num_images`` blocks of image tokens separated by one text token, then text."""
    generator = torch.Generator().manual_seed(seed)
    ids = _text_ids(text_before, generator)
    for i in range(num_images):
        ids += [IMAGE_TOKEN_ID] * TOKENS_PER_IMAGE
        if i < num_images - 1:
            ids += _text_ids(1, generator)
    return ids + _text_ids(text_after, generator)


def make_batch(prompts: list[list[int]], images_per_prompt: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Left-padded batch with pixel values for every image, in prompt order."""
    batch = _left_pad(prompts)
    total = sum(images_per_prompt)
    if total:
        generator = torch.Generator().manual_seed(seed + 1000)
        batch["pixel_values"] = torch.randn(total, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return batch


def sample(num_images: int = 1, text_before: int = 5, text_after: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    return make_batch([prompt_ids(num_images, text_before, text_after, seed)], [num_images], seed=seed)


def llava_prompt(num_images: int, text_before: int, text_after: int, seed: int) -> dict[str, Any]:
    """One LLaVA prompt spec: ids and its own images (so it gets the same pixels alone and in a batch)."""
    generator = torch.Generator().manual_seed(seed + 1000)
    pixels = torch.randn(num_images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return {"ids": prompt_ids(num_images, text_before, text_after, seed), "pixels": pixels}


def llava_batch(prompts: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    batch = _left_pad([p["ids"] for p in prompts])
    pixels = [p["pixels"] for p in prompts if p["pixels"].shape[0]]
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
    return batch


# --- Qwen2-VL / Qwen2.5-VL ------------------------------------------------------------------------------------
def tiny_qwen(kind: str = "qwen2_vl", attn: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """4 text layers (hidden 64, GQA 4/2, mRoPE sections 2/3/3), layers >= 1 use a 24-token sliding window."""
    torch.manual_seed(seed)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB_SIZE, max_position_embeddings=512, pad_token_id=PAD_TOKEN_ID,
                rms_norm_eps=1e-6, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                use_sliding_window=True, sliding_window=24, max_window_layers=1)
    if kind == "qwen2_vl":
        vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=QWEN_PATCH,
                      temporal_patch_size=QWEN_TEMPORAL, spatial_merge_size=QWEN_MERGE)
        config_class, model_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration
    elif kind == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2,
                      patch_size=QWEN_PATCH, temporal_patch_size=QWEN_TEMPORAL, spatial_merge_size=QWEN_MERGE,
                      window_size=8, fullatt_block_indexes=[1], tokens_per_second=2)
        config_class, model_class = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    else:
        raise ValueError(f"kind must be 'qwen2_vl' or 'qwen2_5_vl', got {kind!r}")
    config = config_class(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN_ID,
                          video_token_id=VIDEO_TOKEN_ID, vision_start_token_id=VISION_START_ID,
                          vision_end_token_id=VISION_END_ID)
    config._attn_implementation = attn
    model = model_class(config)
    _scale_up(model)
    model.set_attn_implementation(attn)
    return model.eval()


def qwen_item(kind: str, t: int, h: int, w: int, seed: int) -> dict[str, Any]:
    """An image (t=1) or a video of t temporal patches with an (h, w) patch grid, and its pixel rows."""
    generator = torch.Generator().manual_seed(seed)
    return dict(kind=kind, thw=(t, h, w), pixels=torch.randn(t * h * w, QWEN_PATCH_DIM, generator=generator))


def qwen_prompt(items: list[dict[str, Any]], before: int, after: int, seed: int) -> dict[str, Any]:
    """Text, then each item as <start> placeholders <end> and one text token, then text."""
    generator = torch.Generator().manual_seed(seed)
    ids = _text_ids(before, generator)
    for it in items:
        t, h, w = it["thw"]
        token = IMAGE_TOKEN_ID if it["kind"] == "image" else VIDEO_TOKEN_ID
        ids += [VISION_START_ID] + [token] * (t * h * w // QWEN_MERGE**2) + [VISION_END_ID] + _text_ids(1, generator)
    return dict(ids=ids + _text_ids(after, generator), items=items)


def qwen_batch(prompts: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Left-padded batch as the Qwen2-VL processor builds it (ids, mask, mm_token_type_ids, pixels, grids)."""
    batch = _left_pad([p["ids"] for p in prompts])
    ids = batch["input_ids"]
    batch["mm_token_type_ids"] = (ids == IMAGE_TOKEN_ID).int() + 2 * (ids == VIDEO_TOKEN_ID).int()
    for kind, pixels_key, grid_key in (("image", "pixel_values", "image_grid_thw"),
                                       ("video", "pixel_values_videos", "video_grid_thw")):
        items = [it for p in prompts for it in p["items"] if it["kind"] == kind]
        if items:
            batch[pixels_key] = torch.cat([it["pixels"] for it in items])
            batch[grid_key] = torch.tensor([it["thw"] for it in items])
    return batch


# --- Video-LLaVA ----------------------------------------------------------------------------------------------
def tiny_video_llava(attn: str = "sdpa", seed: int = 0) -> VideoLlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=VIDEO_LLAVA_IMAGE_SIZE, patch_size=VIDEO_LLAVA_PATCH, projection_dim=32)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB_SIZE, max_position_embeddings=512,
                       pad_token_id=PAD_TOKEN_ID, rms_norm_eps=1e-6, tie_word_embeddings=False)
    config = VideoLlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
                              video_token_index=VIDEO_TOKEN_ID, vision_feature_select_strategy="default",
                              vision_feature_layer=-1)
    config._attn_implementation = attn
    model = VideoLlavaForConditionalGeneration(config)
    _scale_up(model)
    model.set_attn_implementation(attn)
    return model.eval()


def video_llava_prompt(num_images: int, num_videos: int, seed: int) -> dict[str, Any]:
    """Text, the images, the videos (each followed by one text token), text; with the pixels of each."""
    generator = torch.Generator().manual_seed(seed)
    ids = _text_ids(3, generator)
    ids += ([IMAGE_TOKEN_ID] * VIDEO_LLAVA_PATCHES + _text_ids(1, generator)) * num_images
    ids += ([VIDEO_TOKEN_ID] * VIDEO_LLAVA_FRAMES * (VIDEO_LLAVA_PATCHES + 1) + _text_ids(1, generator)) * num_videos
    ids += _text_ids(4, generator)
    size = VIDEO_LLAVA_IMAGE_SIZE
    images = [torch.randn(3, size, size, generator=generator) for _ in range(num_images)]
    videos = [torch.randn(VIDEO_LLAVA_FRAMES, 3, size, size, generator=generator) for _ in range(num_videos)]
    return {"ids": ids, "images": images, "videos": videos}


def video_llava_batch(prompts: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    batch = _left_pad([p["ids"] for p in prompts])
    images = [image for p in prompts for image in p["images"]]
    videos = [video for p in prompts for video in p["videos"]]
    if images:
        batch["pixel_values"] = torch.stack(images)
    if videos:
        batch["pixel_values_videos"] = torch.stack(videos)
    return batch


# --- compressors ----------------------------------------------------------------------------------------------
def randomize_compressor(model: torch.nn.Module, seed: int = 1) -> None:
    """Perturb the trainable parts of a compressed model (zero-initialised g_theta included) so they act."""
    import divico

    runtime = divico.get_runtime(model)
    generator = torch.Generator().manual_seed(seed)
    for module in runtime.method.trainable_modules(runtime.adapter, runtime.compressor).values():
        with torch.no_grad():
            for param in module.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * 0.2)
