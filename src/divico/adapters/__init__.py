"""Model adapters, one file per model family; importing this package registers them all."""

from divico.adapters import llava, qwen2_vl, video_llava  # noqa: F401  (each registers its adapter)
from divico.adapters.base import AttentionLayout, ModelAdapter
from divico.registry import available_models, get_adapter, register_adapter

__all__ = ["AttentionLayout", "ModelAdapter", "available_models", "get_adapter", "register_adapter"]
