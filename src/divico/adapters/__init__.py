"""Model adapters, one file per model family; importing this package registers them all."""

from divico.adapters import (  # noqa: F401  (each module registers its adapter)
    gemma3,
    idefics3,
    internvl,
    llava,
    llava_next,
    llava_onevision,
    qwen2_vl,
    qwen3_vl,
    video_llava,
)
from divico.adapters.base import AttentionLayout, ModelAdapter
from divico.registry import available_models, get_adapter, register_adapter

__all__ = ["AttentionLayout", "ModelAdapter", "available_models", "get_adapter", "register_adapter"]
