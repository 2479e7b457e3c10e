"""Adapter for Idefics3 and SmolVLM (`Idefics3ForConditionalGeneration`, `SmolVLMForConditionalGeneration`).

The two classes share the mechanics divico touches (SmolVLM's modeling file is generated from Idefics3's), so one
adapter serves both:

* The text model is ``model.model.text_model`` (not ``language_model``); the connector is a pixel shuffle
  (``scale_factor`` x ``scale_factor`` patches -> one token) followed by ``connector.modality_projection``.
* Image splitting: the processor cuts an image into rows x columns of fixed-size tiles plus a global (downscaled)
  image; each is one entry of ``pixel_values`` (B, max images, 3, H, W) and gives ``image_seq_len`` placeholder
  tokens. Row/column marker tokens (``<row_1_col_2>``, ``<global-img>``, ``<fake_token_around_image>``, newlines)
  stand between the tiles, so an image's visual tokens are *several runs*, one per tile; the markers are text
  tokens and are always kept. Every tile is a fixed-resolution item of :meth:`tokens_per_image` tokens in prompt
  order. SmolVLM's videos are frames the processor turns into such items, so each frame is a tile here too.
* Batches are padded with all-zero images along the image axis; the model drops them before the vision tower, so
  the projector (and the pooling hook on it) sees real tiles only, in prompt order.
* Pools: layer-level methods keep ``keep_ratio`` of all visual tokens of a sample (all tiles of all its images rank
  together); ``per_frame_keep=True`` keeps the same share of every tile.
* DeCo / pooling: each tile's token grid is pooled after the pixel shuffle, before ``modality_projection`` (the base
  adapter's pre-hook on :meth:`projector`); the pooled tokens fill the first slots of the tile's run.
* VisionZip is refused (:meth:`Idefics3Adapter.register_attention_pooling`): it ranks single SigLIP patches, and an
  LLM token here is a shuffled block of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from divico.adapters.llava import LlavaAdapter
from divico.registry import register_adapter


@register_adapter
class Idefics3Adapter(LlavaAdapter):
    """`Idefics3ForConditionalGeneration` / `SmolVLMForConditionalGeneration`: ``image_token_id`` placeholders."""

    model_classes = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
    #: No vision attention for VisionZip (see :meth:`register_attention_pooling` for why).
    capabilities = frozenset()

    def text_model(self) -> nn.Module:
        return self.model.model.text_model

    def projector(self) -> nn.Module:
        """The connector's projection; its input is the pixel-shuffled (tiles, image_seq_len, d x scale^2) grid."""
        return self.model.model.connector.modality_projection

    def tokens_per_image(self) -> int:
        """``image_seq_len`` of one tile: (image_size / patch_size / scale_factor)^2.

        Raises
        ------
        ValueError
            If the tile's patch grid does not fold evenly by the pixel shuffle.
        """
        config = self.model.config
        vision = config.vision_config
        patches = int(vision.image_size) // int(vision.patch_size)
        scale = int(config.scale_factor)
        if patches % scale:
            raise ValueError(
                f"{type(self.model).__name__}: a {patches}x{patches} patch grid (image_size={vision.image_size}, "
                f"patch_size={vision.patch_size}) does not fold by scale_factor={scale}; divico needs "
                "image_size / patch_size to be a multiple of scale_factor."
            )
        return (patches // scale) ** 2

    def pad_token_id(self) -> int:
        """The text model's pad id (0 if none): the top-level config's default, 128002 (Llama 3's), lies outside
        SmolVLM's 49k vocabulary, so filling shortened ids with it would index past the embedding table."""
        value = getattr(self.text_config(), "pad_token_id", None)
        return 0 if value is None else int(value)

    def register_attention_pooling(self, pool: Callable[..., torch.Tensor]) -> list[Any]:
        """Not supported: VisionZip ranks the patches of the vision layer the projector reads, but here each LLM
        token is a pixel-shuffled block of scale_factor x scale_factor SigLIP patches, so no token has one patch's
        attention.

        Raises
        ------
        TypeError
            Always (at ``apply_compression``), naming the input-level methods that work.
        """
        raise TypeError(
            f"{type(self).__name__} does not support VisionZip (register_attention_pooling): its projector maps "
            "pixel-shuffled tokens (blocks of vision patches folded into one), not the vision layer's tokens; use "
            "deco, pooling or divprune (or a layer-level method)."
        )
