"""Where visual items lie in a prompt: patch grids of images / frames, and the pooling of a grid.

Shared by adapters (which know a model's layout) and input-level methods (which pool grids), so neither imports
the other for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch


def item_offsets(mask: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Assign the True positions of ``mask`` (in batch-major order) to consecutive items of the given sizes.

    Parameters
    ----------
    mask
        (B, N) bool.
    sizes
        Token count of each item, in order.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor]
        Item index and offset inside the item of every True position, each (mask.sum(),) long.

    Raises
    ------
    ValueError
        If the sizes do not add up to the number of True positions.
    """
    total = int(mask.sum())
    if sum(sizes) != total:
        raise ValueError(f"The prompt has {total} placeholder tokens but its items need {sum(sizes)} ({sizes}).")
    lengths = torch.tensor(sizes, dtype=torch.long, device=mask.device)
    item = torch.repeat_interleave(torch.arange(len(sizes), device=mask.device), lengths)
    starts = lengths.cumsum(0) - lengths
    offset = torch.arange(total, device=mask.device) - starts[item]
    return item, offset


@dataclass(frozen=True)
class VisualGrid:
    """Layout of one visual item (image, video or video frame) in the prompt.

    The item occupies ``prefix + t * h * w`` consecutive placeholder tokens: ``prefix`` tokens that belong to no
    grid cell (e.g. a CLS token), then a (t, h, w) grid of LLM tokens in row-major order.
    """

    t: int
    h: int
    w: int
    prefix: int = 0

    @property
    def size(self) -> int:
        return self.prefix + self.t * self.h * self.w


VisualLayout = list[tuple[torch.Tensor, list[VisualGrid]]]
"""Per placeholder kind: its (B, N) bool token mask and its items in prompt order (batch-major)."""


def pool_grid_rows(
    features: torch.Tensor, grid: VisualGrid, pool: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Pool the grid part of per-item feature rows, keeping prefix tokens as they are.

    Parameters
    ----------
    features
        (n, grid.size, d): one row per item (image or frame), in the token order of :class:`VisualGrid`.
    grid
        Layout of every row.
    pool
        (n * t, h, w, d) -> (n * t, h', w', d).

    Returns
    -------
    torch.Tensor
        (n, prefix + t * h' * w', d).
    """
    if features.dim() != 3 or features.shape[1] != grid.size:
        raise ValueError(f"Expected features (n, {grid.size}, d) for grid {grid}, got {tuple(features.shape)}.")
    count, _, dim = features.shape
    prefix, cells = features[:, : grid.prefix], features[:, grid.prefix:]
    pooled = pool(cells.reshape(count * grid.t, grid.h, grid.w, dim))
    return torch.cat([prefix, pooled.reshape(count, -1, dim)], dim=1)


def square_grid(tokens_per_image: int) -> VisualGrid:
    """Layout of one image of a fixed-resolution model: a square patch grid, optionally led by one CLS token.

    Raises
    ------
    ValueError
        If ``tokens_per_image`` is neither ``s * s`` nor ``s * s + 1``.
    """
    for prefix in (0, 1):  # a CLS token may lead the patch tokens ("full" feature strategy)
        side = math.isqrt(max(tokens_per_image - prefix, 0))
        if side > 0 and side * side == tokens_per_image - prefix:
            return VisualGrid(1, side, side, prefix)
    raise ValueError(f"{tokens_per_image} tokens per image is not a square patch grid (s * s, or s * s + 1 with CLS).")
