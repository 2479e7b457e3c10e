"""Tiny random-weight LLaVA-NeXT and LLaVA-OneVision models (real transformers classes) and their inputs.

Both: 16 px tiles of 4 px patches (a 4 x 4 grid per tile and for the base image), tile grids from
``PINPOINTS`` (1 x 2, 2 x 1 or 2 x 2 tiles), 4 text layers of width 64 (GQA 4/2), ids as in tests/tiny_models.py
(text < 120, ``<image>`` 120, ``<video>`` 121).

* LLaVA-NeXT (CLIP tower, CLS dropped, Llama text model): inputs come from the real ``LlavaNextProcessor``, built
  offline from a word-level tokenizer and the PIL image processor; it pads ``pixel_values`` along the tile axis.
  A 20 x 40 image is 16 base + 4 rows x (8 + 1) = 52 tokens; a 30 x 24 image (2 x 2 tiles, two of its eight
  mosaic columns cut by the unpadding) 16 + 8 x (6 + 1) = 72.
* LLaVA-OneVision (SigLIP tower, no CLS, Qwen2 text model): its processor needs torchvision for videos (absent),
  so prompts are built by hand in the processor's format: pixels, ``image_sizes`` and ``batch_num_images`` from the
  real ``LlavaOnevisionImageProcessorPil``; an image alone in its sample gets the token count that the real
  LLaVA-NeXT processor computes with OneVision's settings (same unpadding rule; the tiny mosaics stay far below
  ``anyres_max_9``), an image of a multi-image sample ``16 + 1`` tokens, a video of F frames ``F * 2 * 2 + 1``
  (``LlavaOnevisionProcessor.replace_image_token`` / ``replace_video_token``).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)

from tiny_models import FIRST_SPECIAL_ID, IMAGE_TOKEN_ID, PAD_TOKEN_ID, VIDEO_TOKEN_ID, VOCAB_SIZE

TILE = 16  # px per tile side
PATCH = 4
SIDE = TILE // PATCH  # 4: tokens per side of the base grid and of every tile
FRAME_SIDE = 2  # ceil(SIDE / 2): a video frame after OneVision's own 2 x 2 downsampling
PINPOINTS = [[16, 32], [32, 16], [32, 32]]
VIDEO_FRAMES = 4

_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=VOCAB_SIZE, max_position_embeddings=512, pad_token_id=PAD_TOKEN_ID, rms_norm_eps=1e-6,
             tie_word_embeddings=False)
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=TILE,
               patch_size=PATCH)


def _finish(model: torch.nn.Module, attn: str) -> torch.nn.Module:
    with torch.no_grad():  # std-0.02 init gives near-uniform attention: scale up so selection matters
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "embed" not in name:
                param.mul_(4.0)
    model.set_attn_implementation(attn)
    return model.eval()


def tiny_llava_next(attn: str = "sdpa", seed: int = 0) -> LlavaNextForConditionalGeneration:
    torch.manual_seed(seed)
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**_VISION, projection_dim=32), text_config=LlamaConfig(**_TEXT),
        image_token_index=IMAGE_TOKEN_ID, image_grid_pinpoints=PINPOINTS, vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    config._attn_implementation = attn
    return _finish(LlavaNextForConditionalGeneration(config), attn)


def tiny_llava_onevision(attn: str = "sdpa", seed: int = 0) -> LlavaOnevisionForConditionalGeneration:
    torch.manual_seed(seed)
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**_VISION), text_config=Qwen2Config(**_TEXT).to_dict(),
        image_token_index=IMAGE_TOKEN_ID, video_token_index=VIDEO_TOKEN_ID, image_grid_pinpoints=PINPOINTS,
        vision_feature_select_strategy="full", vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9",
    )
    config._attn_implementation = attn
    return _finish(LlavaOnevisionForConditionalGeneration(config), attn)


# --- processors -----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: ``w1``..``w119`` are ids 1..119, ``<image>`` 120, ``<video>`` 121; pads left."""
    vocab = {"<pad>": PAD_TOKEN_ID, **{f"w{i}": i for i in range(1, FIRST_SPECIAL_ID)},
             "<image>": IMAGE_TOKEN_ID, "<video>": VIDEO_TOKEN_ID}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", padding_side="left",
                                   extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})


@functools.lru_cache(maxsize=None)
def llava_next_processor(strategy: str = "default", additional_tokens: int = 1) -> LlavaNextProcessor:
    """The real processor (CLIP: one CLS token, dropped by the "default" strategy)."""
    images = LlavaNextImageProcessorPil(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                                        image_grid_pinpoints=PINPOINTS)
    return LlavaNextProcessor(image_processor=images, tokenizer=tokenizer(), patch_size=PATCH,
                              vision_feature_select_strategy=strategy, image_token="<image>",
                              num_additional_image_tokens=additional_tokens)


@functools.lru_cache(maxsize=None)
def onevision_image_processor() -> LlavaOnevisionImageProcessorPil:
    return LlavaOnevisionImageProcessorPil(size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS)


def image(height: int, width: int, seed: int) -> np.ndarray:
    """A random (height, width, 3) uint8 image."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _words(count: int, generator: torch.Generator) -> list[str]:
    return [f"w{i}" for i in torch.randint(1, FIRST_SPECIAL_ID, (count,), generator=generator).tolist()]


# --- LLaVA-NeXT prompts ---------------------------------------------------------------------------------------
def next_prompt(sizes: list[tuple[int, int]], before: int, after: int, seed: int) -> dict[str, Any]:
    """Text, then each image (``<image>`` and one word), then text; images of the given (height, width)."""
    generator = torch.Generator().manual_seed(seed)
    words = _words(before, generator)
    for _ in sizes:
        words += ["<image>"] + _words(1, generator)
    words += _words(after, generator)
    images = [image(h, w, seed * 10 + i) for i, (h, w) in enumerate(sizes)]
    return {"text": " ".join(words), "images": images, "key": ("next", tuple(sizes), before, after, seed)}


_BATCHES: dict[tuple, dict[str, torch.Tensor]] = {}


def _cached(build: Any, prompts: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """``build(prompts)``, computed once per list of prompt keys (the image processors dominate a tiny forward);
    every call gets its own copies of the tensors."""
    key = tuple(p["key"] for p in prompts)
    if key not in _BATCHES:
        _BATCHES[key] = build(prompts)
    return {name: value.clone() for name, value in _BATCHES[key].items()}


def next_batch(prompts: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """What the real LlavaNextProcessor gives for the prompts (left-padded; pixels padded along the tile axis)."""
    return _cached(_next_batch, prompts)


def _next_batch(prompts: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    images = [img for p in prompts for img in p["images"]]
    out = llava_next_processor()(text=[p["text"] for p in prompts], images=images or None, padding=True,
                                 return_tensors="pt")
    return {key: value for key, value in out.items() if key != "token_type_ids"}


def next_prompts() -> list[dict[str, Any]]:
    """A 20 x 40 image (52 tokens) / a 30 x 24 image (72 tokens, more tiles) / text only."""
    return [next_prompt([(20, 40)], 4, 6, seed=1), next_prompt([(30, 24)], 3, 5, seed=2),
            next_prompt([], 7, 5, seed=3)]


# --- LLaVA-OneVision prompts ----------------------------------------------------------------------------------
def onevision_single_image_tokens(height: int, width: int) -> int:
    """Tokens of an image alone in its sample: the real LLaVA-NeXT processor's count with OneVision's settings
    (SigLIP: no CLS token, ``full`` strategy)."""
    out = llava_next_processor("full", 0)(text=["<image>"], images=[image(height, width, 0)], return_tensors="pt")
    return int((out["input_ids"] == IMAGE_TOKEN_ID).sum())


def onevision_prompt(sizes: list[tuple[int, int]], videos: int, before: int, after: int, seed: int
                     ) -> dict[str, Any]:
    """Text, the images, the videos (each followed by one word), text, in the OneVision processor's format."""
    generator = torch.Generator().manual_seed(seed)
    ids = [int(w[1:]) for w in _words(before, generator)]
    for height, width in sizes:
        count = onevision_single_image_tokens(height, width) if len(sizes) == 1 else SIDE * SIDE + 1
        ids += [IMAGE_TOKEN_ID] * count + [int(w[1:]) for w in _words(1, generator)]
    for _ in range(videos):
        ids += [VIDEO_TOKEN_ID] * (VIDEO_FRAMES * FRAME_SIDE * FRAME_SIDE + 1)
        ids += [int(w[1:]) for w in _words(1, generator)]
    ids += [int(w[1:]) for w in _words(after, generator)]
    clips = [torch.randn(VIDEO_FRAMES, 3, TILE, TILE, generator=generator) for _ in range(videos)]
    images = [image(h, w, seed * 10 + i) for i, (h, w) in enumerate(sizes)]
    return {"ids": ids, "images": images, "videos": clips,
            "key": ("onevision", tuple(sizes), videos, before, after, seed)}


def onevision_batch(prompts: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Left-padded ids and mask; pixels, ``image_sizes`` and ``batch_num_images`` from the real image processor
    (padded along the tile axis over the batch); ``pixel_values_videos`` (videos, frames, 3, 16, 16)."""
    return _cached(_onevision_batch, prompts)


def _onevision_batch(prompts: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    width = max(len(p["ids"]) for p in prompts)
    input_ids = torch.full((len(prompts), width), PAD_TOKEN_ID, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, p in enumerate(prompts):
        input_ids[row, width - len(p["ids"]):] = torch.tensor(p["ids"])
        attention_mask[row, width - len(p["ids"]):] = 1
    batch: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}
    with_images = [p["images"] for p in prompts if p["images"]]
    if with_images:
        pixels = onevision_image_processor()(images=with_images, return_tensors="pt")
        batch["pixel_values"] = pixels["pixel_values"]
        batch["image_sizes"] = pixels["image_sizes"]
        batch["batch_num_images"] = torch.tensor([len(p["images"]) for p in prompts])
    clips = [clip for p in prompts for clip in p["videos"]]
    if clips:
        batch["pixel_values_videos"] = torch.stack(clips)
    return batch


def onevision_prompts() -> list[dict[str, Any]]:
    """A 20 x 40 image with tiles (52 tokens) / two images without tiles (2 x 17) and a 4-frame video (17) / text."""
    return [onevision_prompt([(20, 40)], 0, 4, 6, seed=1), onevision_prompt([(30, 24), (24, 30)], 1, 3, 5, seed=2),
            onevision_prompt([], 0, 7, 5, seed=3)]
