"""Adapter for Video-LLaVA (`VideoLlavaForConditionalGeneration`): image and video inputs.

A video is ``num_frames`` frames, each ``1 + patches`` tokens (the video tower keeps every frame's CLS token); an
image is ``patches`` tokens (``vision_feature_select_strategy="default"`` drops CLS) or ``1 + patches``
(``"full"``). By default all visual tokens of a sample form one pool; ``CompressionConfig(per_frame_keep=True)``
keeps the same share of every frame (and of every image).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from divico.adapters.base import VISION_ATTENTION, ModelAdapter, VisionAttentionStats
from divico.adapters.llava import ClsTowerCapture, register_cls_attention_pooling
from divico.grids import VisualGrid, VisualLayout, pool_grid_rows
from divico.registry import register_adapter


@register_adapter
class VideoLlavaAdapter(ModelAdapter):
    """`VideoLlavaForConditionalGeneration`: ``image_token_id`` and ``video_token_id`` placeholders."""

    model_classes = ("VideoLlavaForConditionalGeneration",)
    capabilities = frozenset({VISION_ATTENTION})

    def text_model(self) -> nn.Module:
        return self.model.model.language_model

    def projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    def visual_token_ids(self) -> tuple[int, ...]:
        return (int(self.model.config.image_token_id), int(self.model.config.video_token_id))

    def _side(self) -> int:
        vision = self.model.config.vision_config
        return int(vision.image_size) // int(vision.patch_size)

    def image_grid(self) -> VisualGrid:
        prefix = 1 if self.model.config.vision_feature_select_strategy == "full" else 0
        return VisualGrid(1, self._side(), self._side(), prefix)

    def frame_grid(self) -> VisualGrid:
        """One video frame: its CLS token, then the patch grid."""
        return VisualGrid(1, self._side(), self._side(), prefix=1)

    def tokens_per_image(self) -> int:
        return self.image_grid().size

    def visual_grids(
        self, input_ids: torch.Tensor | None, visual: torch.Tensor, model_inputs: Mapping[str, Any]
    ) -> VisualLayout:
        """Images, and video frames as separate items (frames of one video are consecutive)."""
        if input_ids is None:
            raise ValueError("Video-LLaVA needs input_ids (not only inputs_embeds) to tell image from video tokens.")
        layout: VisualLayout = []
        config = self.model.config
        for token_id, grid in ((config.image_token_id, self.image_grid()), (config.video_token_id, self.frame_grid())):
            mask = input_ids == int(token_id)
            total = int(mask.sum())
            if total % grid.size:
                raise ValueError(
                    f"{total} tokens with id {token_id} are not a whole number of images/frames of {grid.size} tokens."
                )
            layout.append((mask, [grid] * (total // grid.size)))
        return layout

    def register_feature_pooling(self, pool: Callable[[torch.Tensor], torch.Tensor]) -> list[Any]:
        """Pool every image's and every frame's patch grid before the shared projector (a frame keeps its CLS)."""
        grids = {grid.size: grid for grid in (self.frame_grid(), self.image_grid())}

        def pre_hook(module: nn.Module, args: tuple) -> tuple:
            features = args[0]
            if features.dim() != 3 or features.shape[1] not in grids:
                raise ValueError(
                    f"Video-LLaVA projector input {tuple(features.shape)} matches neither an image nor a frame "
                    f"({sorted(grids)} tokens)."
                )
            return (pool_grid_rows(features, grids[features.shape[1]], pool),) + tuple(args[1:])

        return [self.projector().register_forward_pre_hook(pre_hook)]

    def register_projected_pooling(self, pool: Callable[[torch.Tensor], torch.Tensor]) -> list[Any]:
        """Pool every image's and every frame's projected patch grid (a frame keeps its CLS), after the projector."""
        grids = {grid.size: grid for grid in (self.frame_grid(), self.image_grid())}

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            if output.dim() != 3 or output.shape[1] not in grids:
                raise ValueError(
                    f"Video-LLaVA projector output {tuple(output.shape)} matches neither an image nor a frame "
                    f"({sorted(grids)} tokens)."
                )
            return pool_grid_rows(output, grids[output.shape[1]], pool)

        return [self.projector().register_forward_hook(hook)]

    def register_attention_pooling(
        self, pool: Callable[[torch.Tensor, VisionAttentionStats], torch.Tensor]
    ) -> list[Any]:
        """The [CLS] attention of the image or video tower (whichever ran last), captured from its q/k."""
        inner, layer = self.model.model, self.model.config.vision_feature_layer
        captures = [ClsTowerCapture(inner.image_tower, layer), ClsTowerCapture(inner.video_tower, layer)]
        grids = {grid.size: grid for grid in (self.frame_grid(), self.image_grid())}
        return register_cls_attention_pooling(captures, self.projector(), grids, pool)
