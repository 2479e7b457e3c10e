"""DeCo (Yao et al., 2024): 2-D adaptive average pooling of each image's patch grid before the projector."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from divico.methods.base import InputCompressionMethod
from divico.registry import register_method

if TYPE_CHECKING:
    from divico.adapters.base import ModelAdapter


def pooled_grid(num_tokens: int, grid_height: int, grid_width: int) -> tuple[int, int]:
    """Output grid (h, w) with ``h * w == num_tokens`` closest in aspect to the input grid.

    Raises
    ------
    ValueError
        If no factorisation fits inside the input grid.
    """
    best: tuple[float, int, int] | None = None
    target = math.log(grid_height / grid_width)
    for h in range(1, grid_height + 1):
        if num_tokens % h == 0 and num_tokens // h <= grid_width:
            w = num_tokens // h
            distance = abs(math.log(h / w) - target)
            if best is None or distance < best[0]:
                best = (distance, h, w)
    if best is None:
        raise ValueError(
            f"DeCo cannot pool a {grid_height}x{grid_width} patch grid to {num_tokens} tokens: it must be h*w with "
            f"h <= {grid_height}, w <= {grid_width} (e.g. {min(grid_height, 8) * min(grid_width, 8)})."
        )
    return best[1], best[2]


@register_method("deco")
class DeCo(InputCompressionMethod):
    """Pool the (g x g) patch grid of every image to k = h x w tokens; the projector is trained (see training)."""

    def tokens_per_image(self, num_visual_per_image: int) -> int:
        side = math.isqrt(num_visual_per_image)
        if side * side != num_visual_per_image:
            raise ValueError(
                f"DeCo needs a square patch grid per image; got {num_visual_per_image} visual tokens per image."
            )
        if self.config.keep_tokens is not None:
            if self.config.keep_tokens > num_visual_per_image:
                raise ValueError(
                    f"keep_tokens={self.config.keep_tokens} exceeds the {num_visual_per_image} tokens of one image; "
                    f"valid range is [1, {num_visual_per_image}]."
                )
            count = self.config.keep_tokens
        else:
            count = self.config.keep_count(num_visual_per_image)
        h, w = pooled_grid(count, side, side)
        return h * w

    def compress_features(self, features: torch.Tensor) -> torch.Tensor:
        """Adaptive 2-D average pooling.

        Parameters
        ----------
        features
            (num_images, Nv, d_vision) patch features in row-major grid order.

        Returns
        -------
        torch.Tensor
            (num_images, h * w, d_vision).
        """
        num_images, num_patches, dim = features.shape
        side = math.isqrt(num_patches)
        h, w = pooled_grid(self.tokens_per_image(num_patches), side, side)
        grid = features.reshape(num_images, side, side, dim).permute(0, 3, 1, 2)
        pooled = F.adaptive_avg_pool2d(grid, (h, w))
        return pooled.permute(0, 2, 3, 1).reshape(num_images, h * w, dim)

    def trainable_modules(self, adapter: "ModelAdapter", compressor: nn.Module | None) -> dict[str, nn.Module]:
        return {"projector": adapter.projector()}
