"""Adapter for InternVL 2.5 / 3 (`InternVLForConditionalGeneration`): tiles plus a thumbnail, pixel-shuffled.

What differs from LLaVA, and where it is handled:

* Dynamic resolution by tiling: the processor cuts an image into fixed-size tiles plus a thumbnail; every tile is a
  row of ``pixel_values`` and gives the same number of LLM tokens, so an image is ``tiles x tokens_per_image``
  consecutive ``image_token_id`` placeholders between ``<img>`` and ``</img>``. The adapter treats every tile (the
  thumbnail included) as one fixed-resolution item: :meth:`tokens_per_image` is *per tile*. A video is a list of
  frames the processor turns into images, so each frame is a tile here too.
* Pixel shuffle: the vision tower's patch grid is folded 2 x 2 (``downsample_ratio`` 0.5) into a grid of LLM tokens
  before ``multi_modal_projector``; the token grid of a tile is (side x ratio)^2, row-major.
* Pools: layer-level methods keep ``keep_ratio`` of *all* visual tokens of a sample (tiles and thumbnail of every
  image form one pool, ranked together); with ``per_frame_keep=True`` every tile keeps its own share.
* DeCo / pooling: each tile's token grid is pooled *after* the pixel shuffle and before the projector (a pre-hook on
  ``multi_modal_projector``, the base adapter's), so the projector maps only the pooled tokens and the pooled grid
  is a grid of LLM tokens (pooling before the shuffle would need the pooled side to stay even).
* VisionZip is refused (:meth:`InternVLAdapter.register_attention_pooling`): it ranks single vision patches, and
  an LLM token here is a shuffled block of four.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from divico.adapters.llava import LlavaAdapter
from divico.registry import register_adapter


@register_adapter
class InternVLAdapter(LlavaAdapter):
    """`InternVLForConditionalGeneration`: ``image_token_id`` placeholders, one fixed grid per tile."""

    model_classes = ("InternVLForConditionalGeneration",)
    #: No vision attention for VisionZip (see :meth:`register_attention_pooling` for why).
    capabilities = frozenset()

    def text_model(self) -> nn.Module:
        return self.model.model.language_model

    def projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    def tokens_per_image(self) -> int:
        """LLM tokens of one tile (or thumbnail): the patch grid side x ``downsample_ratio``, squared.

        Raises
        ------
        ValueError
            If the tile is not square, or its patch grid does not fold evenly by the pixel shuffle.
        """
        config = self.model.config
        vision = config.vision_config
        height, width = (int(v) for v in vision.image_size)
        patch_h, patch_w = (int(v) for v in vision.patch_size)
        rows, cols = height // patch_h, width // patch_w
        ratio = float(config.downsample_ratio)
        side = rows * ratio
        if rows != cols or side != int(side) or side < 1:
            raise ValueError(
                f"InternVL tile of {height}x{width} px with {patch_h}x{patch_w} px patches gives a {rows}x{cols} "
                f"patch grid; divico needs a square grid whose side times downsample_ratio={ratio} is a whole number."
            )
        return int(side) ** 2

    def register_attention_pooling(self, pool: Callable[..., torch.Tensor]) -> list[Any]:
        """Not supported: VisionZip ranks the patches of the vision layer the projector reads, but here each LLM
        token is a pixel-shuffled 2 x 2 block of patches (4 x the vision width), and the [CLS] token the method
        would keep has the vision width.

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
