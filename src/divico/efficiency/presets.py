"""Named model shapes for benchmarks, built with random weights (no download needed).

A preset is a LLaVA configuration: a CLIP vision tower, a two-layer MLP projector and a Llama
(Vicuna) language model. ``llava-1.5-7b`` and ``llava-1.5-13b`` reproduce the shapes of
``llava-hf/llava-1.5-{7b,13b}-hf`` (CLIP ViT-L/14 at 336 px, 576 visual tokens per image; Vicuna
hidden 4096/5120, heads 32/40, MLP 11008/13824, 32/40 layers). Their text vocabulary is 32064, as in
the ``-hf`` checkpoints, so that the ``<image>`` id 32000 is a valid embedding row; the original
vocabulary of 32000 changes the LM head's FLOPs by 0.2%.

The newer presets (``llava-onevision-7b``, ``qwen2.5-vl-7b``, ``qwen3-vl-8b``, ``internvl3-8b``, ``gemma-3-4b``,
``gemma-3-12b``, ``smolvlm2-2.2b``) are the same LLaVA construction shaped like those models, from their public
``config.json`` (the hub repository is named in each preset's ``source``): the language model exactly (hidden size,
MLP width, depth, query / KV heads, head dim, vocabulary, tied embeddings, q/k/v biases) and a vision tower of the
real encoder's width, depth and heads (a CLIP layer stands in for SigLIP / InternViT / the Qwen ViT; Qwen2.5-VL's
SwiGLU MLP of width m is a plain MLP of width 1.5 m, the same weights). Their parameter counts are within 2% of the
published sizes (``published_parameters_b``; checked in tests/test_presets.py). What they do *not* reproduce:
the model-specific layers that do not change the LLM's cost (Gemma 3's sliding-window layers and soft-capping,
Qwen3's q/k norms and DeepStack mergers, the real projectors, 1-3% of the weights) and the vision tower's cost per
visual token: one preset image of ``image_size / patch_size`` squared patches gives as many LLM tokens as one real
image (or tile) gives after that model's own pixel shuffle / patch merge / pooling, so the real tower sees 4x
(InternVL, Qwen), 9x (SmolVLM) or 16x (Gemma 3) more patches per visual token than the preset's.

Truncation: ``layers=N`` keeps the first N decoder layers. Every decoder layer of these models has the
same shape, so a full-depth figure is extrapolated per layer: ``full = measured + (L - N) x (the
measured cost of one layer at the compressed length)`` (see :func:`extrapolate_layers`). For FLOPs the
analytic count is simply evaluated at full depth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

__all__ = [
    "PRESETS",
    "Preset",
    "PromptShape",
    "build_config",
    "build_inputs",
    "build_random_model",
    "extrapolate_layers",
    "images_for_visual_tokens",
    "load_model",
    "preset_names",
]


@dataclass(frozen=True)
class Preset:
    """Shapes of one LLaVA-style model.

    Attributes
    ----------
    name : str
        Preset name used on the command line.
    description : str
        One line saying what real model the shapes follow.
    vision : dict
        Keyword arguments of ``transformers.CLIPVisionConfig``.
    text : dict
        Keyword arguments of ``transformers.LlamaConfig``.
    llava : dict
        Extra keyword arguments of ``transformers.LlavaConfig``.
    source : str
        Where the shapes come from (hub repositories of the real model's ``config.json``), or "".
    published_parameters_b : float or None
        The real model's published parameter count in billions (its model card), for the shape check.
    """

    name: str
    description: str
    vision: dict[str, Any] = field(default_factory=dict)
    text: dict[str, Any] = field(default_factory=dict)
    llava: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    published_parameters_b: float | None = None


_CLIP_L14_336: dict[str, Any] = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)

_LLAVA_15: dict[str, Any] = dict(
    image_token_id=32000,
    vision_feature_layer=-2,
    vision_feature_select_strategy="default",
    projector_hidden_act="gelu",
)

PRESETS: dict[str, Preset] = {
    "llava-1.5-7b": Preset(
        name="llava-1.5-7b",
        description="llava-hf/llava-1.5-7b-hf shapes: CLIP ViT-L/14-336 + Vicuna-7B (32 layers)",
        vision=_CLIP_L14_336,
        text=dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32064,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
        ),
        llava=_LLAVA_15,
        source="llava-hf/llava-1.5-7b-hf",
        published_parameters_b=7.06,
    ),
    "llava-1.5-13b": Preset(
        name="llava-1.5-13b",
        description="llava-hf/llava-1.5-13b-hf shapes: CLIP ViT-L/14-336 + Vicuna-13B (40 layers)",
        vision=_CLIP_L14_336,
        text=dict(
            hidden_size=5120,
            intermediate_size=13824,
            num_hidden_layers=40,
            num_attention_heads=40,
            num_key_value_heads=40,
            vocab_size=32064,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
        ),
        llava=_LLAVA_15,
        source="llava-hf/llava-1.5-13b-hf",
        published_parameters_b=13.4,
    ),
    "tiny-llava": Preset(
        name="tiny-llava",
        description="tiny random LLaVA for tests: CLIP (2 layers, 64 wide) + Llama with GQA (4 layers)",
        vision=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=84,
            patch_size=14,
            projection_dim=32,
            hidden_act="quick_gelu",
        ),
        text=dict(
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=320,
            max_position_embeddings=4096,
        ),
        llava=dict(_LLAVA_15, image_token_id=300),
    ),
}


def _vision(hidden: int, mlp: int, layers: int, heads: int, tokens_side: int, act: str) -> dict[str, Any]:
    """CLIP-layer kwargs of a vision tower; ``tokens_side`` x ``tokens_side`` patches = LLM tokens of one image."""
    return dict(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads,
                image_size=tokens_side * 14, patch_size=14, projection_dim=hidden, hidden_act=act,
                layer_norm_eps=1e-6)


def _text(hidden: int, mlp: int, layers: int, heads: int, kv_heads: int, vocab: int, head_dim: int | None = None,
          tied: bool = False, bias: bool = False, act: str = "silu", max_positions: int = 32768) -> dict[str, Any]:
    """LlamaConfig kwargs of a language model (``bias``: q/k/v projection biases, as Qwen2 / Qwen2.5)."""
    kwargs = dict(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, vocab_size=vocab, tie_word_embeddings=tied, attention_bias=bias,
                  hidden_act=act, max_position_embeddings=max_positions, rms_norm_eps=1e-6)
    if head_dim is not None:
        kwargs["head_dim"] = head_dim
    return kwargs


def _llava_style(image_token_id: int) -> dict[str, Any]:
    # Last layer, CLS dropped: one image = its patch grid (SigLIP-style towers have no CLS token).
    return dict(image_token_id=image_token_id, vision_feature_layer=-1, vision_feature_select_strategy="default",
                projector_hidden_act="gelu")


# Sizes from each model's public config.json (hub repository in `source`); parameter counts from the model cards.
# Qwen2-7B / Qwen2.5-7B: hidden 3584, MLP 18944, 28 layers, 28 / 4 heads, vocab 152064 (InternVL3: 151674), q/k/v
# biases. SigLIP-so400m: 1152 wide, MLP 4304, 27 layers, 16 heads. Qwen2.5-VL ViT: 1280 wide, SwiGLU 3420, 32 layers.
# InternViT-300M: 1024 wide, MLP 4096, 24 layers, 16 heads. Qwen3-8B: hidden 4096, MLP 12288, 36 layers, 32 / 8
# heads, head dim 128, vocab 151936. Gemma 3 4B / 12B: hidden 2560 / 3840, MLP 10240 / 15360, 34 / 48 layers,
# 8 / 4 and 16 / 8 heads, head dim 256, vocab 262208, tied. SmolLM2-1.7B in SmolVLM2: hidden 2048, MLP 8192,
# 24 layers, 32 / 32 heads, vocab 49280.
_QWEN2_7B = dict(hidden=3584, mlp=18944, layers=28, heads=28, kv_heads=4, bias=True)
_SIGLIP_SO400M = dict(hidden=1152, mlp=4304, layers=27, heads=16, act="gelu_pytorch_tanh")

PRESETS.update({
    "llava-onevision-7b": Preset(
        name="llava-onevision-7b",
        description="LLaVA-OneVision-7B shapes: SigLIP-so400m (729 tokens per 384 px image) + Qwen2-7B (28 layers)",
        vision=_vision(**_SIGLIP_SO400M, tokens_side=27),
        text=_text(**_QWEN2_7B, vocab=152064),
        llava=_llava_style(151646),
        source="llava-hf/llava-onevision-qwen2-7b-ov-hf",
        published_parameters_b=8.03,
    ),
    "qwen2.5-vl-7b": Preset(
        name="qwen2.5-vl-7b",
        description="Qwen2.5-VL-7B shapes: 32-layer ViT (one image: 32 x 32 merged tokens) + Qwen2.5-7B (28 layers)",
        vision=_vision(hidden=1280, mlp=3420 * 3 // 2, layers=32, heads=16, tokens_side=32, act="silu"),
        text=_text(**_QWEN2_7B, vocab=152064, max_positions=128000),
        llava=_llava_style(151655),
        source="Qwen/Qwen2.5-VL-7B-Instruct",
        published_parameters_b=8.29,
    ),
    "qwen3-vl-8b": Preset(
        name="qwen3-vl-8b",
        description="Qwen3-VL-8B shapes: 27-layer SigLIP-2-style ViT (32 x 32 merged tokens) + Qwen3-8B (36 layers)",
        vision=_vision(**_SIGLIP_SO400M, tokens_side=32),
        text=_text(hidden=4096, mlp=12288, layers=36, heads=32, kv_heads=8, head_dim=128, vocab=151936,
                   max_positions=262144),
        llava=_llava_style(151655),
        source="Qwen/Qwen3-VL-8B-Instruct",
        published_parameters_b=8.77,
    ),
    "internvl3-8b": Preset(
        name="internvl3-8b",
        description="InternVL3-8B shapes: InternViT-300M (256 tokens per 448 px tile) + Qwen2.5-7B (28 layers)",
        vision=_vision(hidden=1024, mlp=4096, layers=24, heads=16, tokens_side=16, act="gelu"),
        text=_text(**_QWEN2_7B, vocab=151674),
        llava=_llava_style(151667),
        source="OpenGVLab/InternVL3-8B-hf",
        published_parameters_b=7.94,
    ),
    "gemma-3-4b": Preset(
        name="gemma-3-4b",
        description="Gemma-3-4B shapes: SigLIP-so400m (256 tokens per 896 px image) + Gemma 3 4B (34 layers)",
        vision=_vision(**_SIGLIP_SO400M, tokens_side=16),
        text=_text(hidden=2560, mlp=10240, layers=34, heads=8, kv_heads=4, head_dim=256, vocab=262208, tied=True,
                   act="gelu_pytorch_tanh", max_positions=131072),
        llava=_llava_style(262144),
        source="google/gemma-3-4b-it",
        published_parameters_b=4.30,
    ),
    "gemma-3-12b": Preset(
        name="gemma-3-12b",
        description="Gemma-3-12B shapes: SigLIP-so400m (256 tokens per 896 px image) + Gemma 3 12B (48 layers)",
        vision=_vision(**_SIGLIP_SO400M, tokens_side=16),
        text=_text(hidden=3840, mlp=15360, layers=48, heads=16, kv_heads=8, head_dim=256, vocab=262208, tied=True,
                   act="gelu_pytorch_tanh", max_positions=131072),
        llava=_llava_style(262144),
        source="google/gemma-3-12b-it",
        published_parameters_b=12.2,
    ),
    "smolvlm2-2.2b": Preset(
        name="smolvlm2-2.2b",
        description="SmolVLM2-2.2B shapes: SigLIP-so400m (81 tokens per 384 px tile) + SmolLM2-1.7B (24 layers)",
        vision=_vision(**_SIGLIP_SO400M, tokens_side=9),
        text=_text(hidden=2048, mlp=8192, layers=24, heads=32, kv_heads=32, vocab=49280, max_positions=8192),
        llava=_llava_style(49190),
        source="HuggingFaceTB/SmolVLM2-2.2B-Instruct",
        published_parameters_b=2.25,
    ),
})


def preset_names() -> list[str]:
    """Names of the presets, sorted."""
    return sorted(PRESETS)


def _get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(preset_names())}")
    return PRESETS[name]


@dataclass(frozen=True)
class PromptShape:
    """Token counts of one benchmark prompt (per sample).

    The prompt is laid out as ``[system tokens][image 1 tokens]...[image n tokens][text tokens]``.

    Attributes
    ----------
    visual_tokens : int
        Visual tokens over all images of one sample (``Nv``).
    text_tokens : int
        Text tokens after the images (question, chat template).
    system_tokens : int
        Text tokens before the images.
    batch_size : int
        Samples per batch (all of the same length, no padding).
    images : int
        Images per sample; each gives ``visual_tokens / images`` tokens.
    """

    visual_tokens: int
    text_tokens: int
    system_tokens: int = 0
    batch_size: int = 1
    images: int = 1

    def __post_init__(self) -> None:
        for name in ("visual_tokens", "text_tokens", "system_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        for name in ("batch_size", "images"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.visual_tokens % self.images:
            raise ValueError(
                f"visual_tokens={self.visual_tokens} is not divisible by images={self.images}"
            )
        if self.text_tokens + self.system_tokens < 1:
            raise ValueError("a prompt needs at least one text token (system_tokens + text_tokens >= 1)")

    @property
    def seq_len(self) -> int:
        """Tokens per sample: system + visual + text."""
        return self.system_tokens + self.visual_tokens + self.text_tokens

    @property
    def visual_tokens_per_image(self) -> int:
        """Visual tokens each image contributes."""
        return self.visual_tokens // self.images


def images_for_visual_tokens(visual_tokens: int, max_images: int = 64) -> tuple[int, int]:
    """Split a visual-token count into the fewest square patch grids.

    Parameters
    ----------
    visual_tokens : int
        Total visual tokens per sample, e.g. 576 (one 24x24 grid) or 2048 (two 32x32 grids).
    max_images : int
        Largest number of images tried.

    Returns
    -------
    tuple of int
        ``(images, grid_side)`` with ``images * grid_side**2 == visual_tokens``.
    """
    if not isinstance(visual_tokens, int) or visual_tokens < 1:
        raise ValueError(f"visual_tokens must be an integer >= 1, got {visual_tokens!r}")
    for images in range(1, max_images + 1):
        if visual_tokens % images:
            continue
        side = math.isqrt(visual_tokens // images)
        if side * side * images == visual_tokens:
            return images, side
    raise ValueError(
        f"visual_tokens={visual_tokens} is not n * s^2 for any n <= {max_images} images of an s x s grid"
    )


def build_config(
    name: str,
    layers: int | None = None,
    visual_tokens: int | None = None,
    images: int | None = None,
    attn_implementation: str = "sdpa",
) -> Any:
    """Build the ``LlavaConfig`` of a preset.

    Parameters
    ----------
    name : str
        Preset name (see :func:`preset_names`).
    layers : int, optional
        Keep only the first ``layers`` decoder layers (1 <= layers <= the preset's depth).
    visual_tokens : int, optional
        Visual tokens per sample; the vision tower's ``image_size`` is set so that each image gives
        ``visual_tokens / images`` patches (random weights, so any square grid is valid). Default: the
        preset's own (576 for the LLaVA-1.5 shapes).
    images : int, optional
        Images per sample; default: the fewest that make square grids.
    attn_implementation : str
        ``"sdpa"`` or ``"eager"``.

    Returns
    -------
    transformers.LlavaConfig
    """

    preset = _get_preset(name)
    text_kwargs = dict(preset.text)
    vision_kwargs = dict(preset.vision)
    full_depth = text_kwargs["num_hidden_layers"]
    if layers is not None:
        if not isinstance(layers, int) or not 1 <= layers <= full_depth:
            raise ValueError(f"layers must be an integer in [1, {full_depth}] for {name}, got {layers!r}")
        text_kwargs["num_hidden_layers"] = layers
    if visual_tokens is not None:
        if images is None:
            images, side = images_for_visual_tokens(visual_tokens)
        else:
            if not isinstance(images, int) or images < 1 or visual_tokens % images:
                raise ValueError(f"images={images!r} must be an integer >= 1 dividing {visual_tokens}")
            side = math.isqrt(visual_tokens // images)
            if side * side != visual_tokens // images:
                raise ValueError(f"{visual_tokens} / {images} images is not a square patch grid")
        vision_kwargs["image_size"] = side * vision_kwargs["patch_size"]
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision_kwargs),
        text_config=LlamaConfig(**text_kwargs),
        **preset.llava,
    )
    config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    config.vision_config._attn_implementation = attn_implementation
    # Recorded so that benchmarks can extrapolate a truncated model to the real depth.
    config.divico_full_num_hidden_layers = full_depth
    config.divico_preset = name
    return config


def build_random_model(config: Any, dtype: torch.dtype = torch.float32, seed: int = 0) -> Any:
    """Instantiate a ``LlavaForConditionalGeneration`` with real random weights.

    Weights are materialised (not on the meta device) so that timings and memory are real.

    Parameters
    ----------
    config : transformers.LlavaConfig
    dtype : torch.dtype
        ``torch.float32`` or ``torch.bfloat16``; parameters are created in this dtype directly.
    seed : int
        Seed of the initialisation.

    Returns
    -------
    transformers.LlavaForConditionalGeneration
        In eval mode, on CPU.
    """

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    return model.eval()


def load_model(
    spec: str,
    layers: int | None = None,
    dtype: torch.dtype = torch.float32,
    visual_tokens: int | None = None,
    attn_implementation: str = "sdpa",
) -> Any:
    """Load a model from a preset name, a local directory or a hub id.

    Parameters
    ----------
    spec : str
        A preset name (random weights), a local directory with ``config.json`` or a hub id.
    layers : int, optional
        Keep only the first ``layers`` decoder layers.
    dtype : torch.dtype
    visual_tokens : int, optional
        Visual tokens per sample (presets only: sets the vision tower's image size).
    attn_implementation : str

    Returns
    -------
    transformers.PreTrainedModel
        In eval mode.
    """
    if spec in PRESETS:
        config = build_config(spec, layers=layers, visual_tokens=visual_tokens,
                              attn_implementation=attn_implementation)
        return build_random_model(config, dtype=dtype)

    is_local = Path(spec).is_dir()
    if not is_local and ("/" not in spec or Path(spec).exists()):
        raise ValueError(
            f"{spec!r} is neither a preset ({', '.join(preset_names())}) nor a model directory nor a hub id"
        )
    config = AutoConfig.from_pretrained(spec, local_files_only=is_local)
    full_depth = config.text_config.num_hidden_layers
    if layers is not None:
        if not 1 <= layers <= full_depth:
            raise ValueError(f"layers must be in [1, {full_depth}] for {spec}, got {layers}")
        config.text_config.num_hidden_layers = layers
    config.divico_full_num_hidden_layers = full_depth
    model = AutoModelForImageTextToText.from_pretrained(
        spec, config=config, dtype=dtype, attn_implementation=attn_implementation,
        local_files_only=is_local,
    )
    return model.eval()


def build_inputs(
    config: Any,
    prompt: PromptShape,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random LLaVA inputs with the given token counts.

    Parameters
    ----------
    config : transformers.LlavaConfig
    prompt : PromptShape
        ``prompt.visual_tokens_per_image`` must equal the patches of one image of the vision config.
    device, dtype
        Where ``pixel_values`` go and their dtype.
    seed : int

    Returns
    -------
    dict
        ``input_ids`` (B, N) with ``config.image_token_id`` at the visual positions,
        ``attention_mask`` (B, N) of ones, ``pixel_values`` (B * images, 3, S, S).
    """
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    per_image = patches + (1 if config.vision_feature_select_strategy == "full" else 0)
    if prompt.visual_tokens_per_image != per_image:
        raise ValueError(
            f"the vision tower gives {per_image} tokens per image (image_size={vision.image_size}, "
            f"patch_size={vision.patch_size}) but the prompt asks for {prompt.visual_tokens_per_image}"
        )
    generator = torch.Generator().manual_seed(seed)
    image_token_id = int(config.image_token_id)
    # Ordinary text ids: below the image id and the vocabulary, avoiding 0-2 (unk/bos/eos).
    text_high = min(image_token_id, config.text_config.vocab_size)
    batch = prompt.batch_size

    def text_ids(count: int) -> torch.Tensor:
        return torch.randint(3, text_high, (batch, count), generator=generator)

    image_ids = torch.full((batch, prompt.visual_tokens), image_token_id, dtype=torch.long)
    input_ids = torch.cat([text_ids(prompt.system_tokens), image_ids, text_ids(prompt.text_tokens)], dim=1)
    pixel_values = torch.randn(
        batch * prompt.images, vision.num_channels, vision.image_size, vision.image_size, generator=generator
    )
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "pixel_values": pixel_values.to(device=device, dtype=dtype),
    }


def extrapolate_layers(measured_total: float, per_layer: float, layers_run: int, full_depth: int) -> float:
    """Extrapolate a truncated model's figure to full depth, one identical layer at a time.

    Parameters
    ----------
    measured_total : float
        The figure measured with ``layers_run`` decoder layers (seconds, bytes, ...).
    per_layer : float
        The figure of one decoder layer at the depth being added (layers >= K see the compressed
        sequence, so this is a post-K layer's figure).
    layers_run, full_depth : int

    Returns
    -------
    float
        ``measured_total + (full_depth - layers_run) * per_layer``.
    """
    if not 1 <= layers_run <= full_depth:
        raise ValueError(f"layers_run must be in [1, {full_depth}], got {layers_run}")
    return measured_total + (full_depth - layers_run) * per_layer
