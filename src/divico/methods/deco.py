"""DeCo (Yao et al., 2024): 2-D adaptive average pooling of each image's patch grid before the projector."""

from __future__ import annotations

import functools
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from divico.adapters.base import ModelAdapter
from divico.methods.base import InputCompressionMethod
from divico.registry import register_method


#: Largest aspect distortion of a pooled grid that DeCo accepts: its pooling windows ((h / h') x (w / w') patches of
#: an h x w patch grid) may be at most 4:3 or 3:4. It refuses the lopsided grids that
#: exact factorisation gives for counts such as 10 (2 x 5 windows of 12 x 4.8 patches on a 24 x 24 grid), 38
#: (2 x 19) or 96 (8 x 12, windows 3 x 2), and accepts 3 x 4 grids.
MAX_ASPECT_DISTORTION = Fraction(4, 3)


def aspect_distortion(height: int, width: int, grid_height: int, grid_width: int) -> Fraction:
    """How far the aspect of a (height x width) grid is from a (grid_height x grid_width) grid's, as a factor >= 1.

    Equal to the aspect of the pooling windows, longer side over shorter: 1 for square windows.
    """
    ratio = Fraction(height * grid_width, width * grid_height)
    return max(ratio, 1 / ratio)


def _closest_factorisation(num_tokens: int, grid_height: int, grid_width: int) -> tuple[int, int] | None:
    """(h, w) with ``h * w == num_tokens`` inside the grid, least aspect distortion (ties: smaller h); None if none."""
    best: tuple[Fraction, int, int] | None = None
    for height in range(1, min(grid_height, num_tokens) + 1):
        width, remainder = divmod(num_tokens, height)
        if remainder or width > grid_width:
            continue
        distortion = aspect_distortion(height, width, grid_height, grid_width)
        if best is None or distortion < best[0]:
            best = (distortion, height, width)
    return None if best is None else (best[1], best[2])


def _acceptable_factorisation(num_tokens: int, grid_height: int, grid_width: int) -> tuple[int, int] | None:
    """The closest factorisation of ``num_tokens`` if it is not lopsided (see :func:`pooled_grid`), else None."""
    grid = _closest_factorisation(num_tokens, grid_height, grid_width)
    if grid is None:
        return None
    # Square windows of side sqrt(H * W / k) do not fit across a grid thinner than that: every count near k is as
    # lopsided, so the closest factorisation is accepted.
    too_thin_for_square_windows = grid_height * grid_width > num_tokens * min(grid_height, grid_width) ** 2
    if too_thin_for_square_windows or aspect_distortion(*grid, grid_height, grid_width) <= MAX_ASPECT_DISTORTION:
        return grid
    return None


@functools.lru_cache(maxsize=4096)  # pure in its three ints; called for every image of every prefill
def pooled_grid(num_tokens: int, grid_height: int, grid_width: int) -> tuple[int, int]:
    """The grid (h', w') DeCo pools a (grid_height x grid_width) patch grid to for a target of ``num_tokens``.

    The factorisation ``h' * w' == num_tokens`` (``h' <= grid_height``, ``w' <= grid_width``) whose aspect is
    closest to the patch grid's (ties: the smaller h'). If even that one is lopsided — its pooling windows off
    square by more than :data:`MAX_ASPECT_DISTORTION` — the nearest count that has an acceptable grid is used
    instead (ties: the smaller count), so ``h' * w'`` may differ from ``num_tokens``: the count DeCo really keeps,
    which :func:`divico.last_report`, the FLOPs and the tables report. A grid too thin for square windows at this
    count (``grid_height * grid_width > num_tokens * min(grid_height, grid_width)**2``) keeps the count.

    On a 24 x 24 grid: 10 -> 3 x 3, 16 -> 4 x 4, 24 -> 5 x 5, 38 -> 6 x 6, 64 -> 8 x 8, 96 -> 9 x 11.

    Raises
    ------
    ValueError
        If ``num_tokens`` is outside [1, grid_height * grid_width].
    """
    cells = grid_height * grid_width
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or not 1 <= num_tokens <= cells:
        raise ValueError(
            f"DeCo cannot pool a {grid_height}x{grid_width} patch grid to {num_tokens!r} tokens; valid range is "
            f"[1, {cells}]."
        )
    for distance in range(cells):
        for count in (num_tokens - distance, num_tokens + distance):
            if 1 <= count <= cells:
                grid = _acceptable_factorisation(count, grid_height, grid_width)
                if grid is not None:
                    return grid
    raise AssertionError("unreachable: the whole grid is always acceptable")


class AdaptiveAveragePooling(InputCompressionMethod):
    """2-D adaptive average pooling of every image's (every frame's) patch grid to a near-square h' x w' grid.

    Not registered itself: the shared behaviour of DeCo (which trains the projector) and ``pooling`` (which does
    not). The adapter applies :meth:`pool` to the vision features before the projector.
    """

    def pooled_size(self, height: int, width: int) -> tuple[int, int]:
        """Pooled grid of one image / frame: :func:`pooled_grid` of ``keep_tokens`` (or ``keep_ratio`` of the cells).

        ``h' * w'`` is the count really kept, which can differ from the target where the target has no near-square
        grid (see :func:`pooled_grid`).

        Raises
        ------
        ValueError
            If ``keep_tokens`` exceeds the grid.
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


@register_method("deco")
class DeCo(AdaptiveAveragePooling):
    """Pool the patch grid of every image (every frame of a video) to k = h x w tokens; the projector is trained."""

    display_name = "DeCo"

    def trainable_modules(self, adapter: ModelAdapter, compressor: nn.Module | None) -> dict[str, nn.Module]:
        return {"projector": adapter.projector()}
