"""Model adapters, one file per model family; importing this package registers them all."""

from divico.adapters.base import AttentionLayout, ModelAdapter, available_models, get_adapter, register_adapter
from divico.adapters import llava  # noqa: F401  (registers LlavaAdapter)

__all__ = ["AttentionLayout", "ModelAdapter", "available_models", "get_adapter", "register_adapter"]
