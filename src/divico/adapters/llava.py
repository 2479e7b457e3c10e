"""Adapter for LLaVA-1.5 / LLaVA-NeXT-style models (`LlavaForConditionalGeneration`)."""

from __future__ import annotations

from torch import nn

from divico.adapters.base import ModelAdapter
from divico.registry import register_adapter


@register_adapter
class LlavaAdapter(ModelAdapter):
    """`LlavaForConditionalGeneration`: image tokens are ``config.image_token_id`` placeholders in ``input_ids``."""

    model_classes = ("LlavaForConditionalGeneration",)

    def text_model(self) -> nn.Module:
        return self.model.model.language_model

    def projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    def visual_token_ids(self) -> tuple[int, ...]:
        return (int(self.model.config.image_token_id),)

    def tokens_per_image(self) -> int:
        vision = self.model.config.vision_config
        side = int(vision.image_size) // int(vision.patch_size)
        extra = 1 if self.model.config.vision_feature_select_strategy == "full" else 0
        return side * side + extra
