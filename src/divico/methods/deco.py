"""DeCo (Yao et al., 2024): 2-D adaptive average pooling of each image's patch grid before the projector."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from divico.adapters.base import ModelAdapter
from divico.methods.base import InputCompressionMethod
from divico.registry import register_method


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
    """Pool the patch grid of every image (every frame of a video) to k = h x w tokens; the projector is trained."""

    display_name = "DeCo"

    def pooled_size(self, height: int, width: int) -> tuple[int, int]:
        """Pooled grid of one image / frame: ``keep_tokens`` cells (or ``keep_ratio`` of them) as h' x w'.

        Raises
        ------
        ValueError
            If ``keep_tokens`` exceeds the grid or the count has no factorisation that fits in it.
        """
        num_cells = height * width
        if self.config.keep_tokens is not None and self.config.keep_tokens > num_cells:
            raise ValueError(
                f"keep_tokens={self.config.keep_tokens} exceeds the {num_cells} tokens of one {height}x{width} "
                f"image/frame grid; valid range is [1, {num_cells}]."
            )
        return pooled_grid(self.config.keep_count(num_cells), height, width)

    def pool(self, cells: torch.Tensor) -> torch.Tensor:
        """Adaptive 2-D average pooling.

        Parameters
        ----------
        cells
            (n, h, w, d) patch features of n images / frames.

        Returns
        -------
        torch.Tensor
            (n, h', w', d).
        """
        _, height, width, _ = cells.shape
        target = self.pooled_size(height, width)
        pooled = F.adaptive_avg_pool2d(cells.permute(0, 3, 1, 2), target)
        return pooled.permute(0, 2, 3, 1)

    def trainable_modules(self, adapter: ModelAdapter, compressor: nn.Module | None) -> dict[str, nn.Module]:
        return {"projector": adapter.projector()}
