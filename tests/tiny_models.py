"""Tiny random-weight LLaVA models and inputs for tests (real transformers classes, seconds to build)."""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN_ID = 120
PAD_TOKEN_ID = 0
VOCAB_SIZE = 128
IMAGE_SIZE = 32
PATCH_SIZE = 4
TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 64, CLS dropped by the "default" strategy


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
    # Random init is tiny (std 0.02): scale up so attention is far from uniform and selection matters.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "embed" not in name:
                param.mul_(4.0)
    model.set_attn_implementation(attn_implementation)
    return model.eval()


def prompt_ids(num_images: int, text_before: int, text_after: int, seed: int) -> list[int]:
    """Token ids: text, then ``num_images`` blocks of image tokens separated by one text token, then text."""
    generator = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(1, IMAGE_TOKEN_ID, (n,), generator=generator).tolist()  # noqa: E731
    ids = text(text_before)
    for i in range(num_images):
        ids += [IMAGE_TOKEN_ID] * TOKENS_PER_IMAGE
        if i < num_images - 1:
            ids += text(1)
    return ids + text(text_after)


def make_batch(prompts: list[list[int]], images_per_prompt: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Left-padded batch with pixel values for every image, in prompt order."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), PAD_TOKEN_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention_mask[row, width - len(ids):] = 1
    batch: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}
    total = sum(images_per_prompt)
    if total:
        generator = torch.Generator().manual_seed(seed + 1000)
        batch["pixel_values"] = torch.randn(total, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return batch


def sample(num_images: int = 1, text_before: int = 5, text_after: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    return make_batch([prompt_ids(num_images, text_before, text_after, seed)], [num_images], seed=seed)


def randomize_compressor(model: torch.nn.Module, seed: int = 1) -> None:
    """Perturb the trainable parts of a compressed model (zero-initialised g_theta included) so they act."""
    import divico

    runtime = divico.get_runtime(model)
    generator = torch.Generator().manual_seed(seed)
    for module in runtime.method.trainable_modules(runtime.adapter, runtime.compressor).values():
        with torch.no_grad():
            for param in module.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * 0.2)
