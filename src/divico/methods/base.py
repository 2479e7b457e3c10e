"""Base classes of compression methods (one subclass per file, registered with `@register_method`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from torch import nn

from divico.config import CompressionConfig
from divico.selection import TokenSelection, top_k_keep_mask

if TYPE_CHECKING:
    from divico.adapters.base import ModelAdapter, VisualGrid


class CompressionMethod:
    """A visual-token compression method.

    ``level="layer"`` methods act between decoder layers K-1 and K: the engine scores tokens, the method picks
    the kept set (:meth:`select`) and builds the compressed hidden states (:meth:`compress`).
    ``level="input"`` methods change the visual tokens before the LLM (see :class:`InputCompressionMethod`).
    """

    name: ClassVar[str] = ""
    level: ClassVar[Literal["layer", "input"]] = "layer"
    needs_scores: ClassVar[bool] = True

    def __init__(self, config: CompressionConfig) -> None:
        self.config = config

    def build_compressor(self, adapter: "ModelAdapter") -> nn.Module | None:
        """Trainable module this method adds to the model (attached as ``model.divico_compressor``), or None."""
        return None

    def trainable_modules(self, adapter: "ModelAdapter", compressor: nn.Module | None) -> dict[str, nn.Module]:
        """Modules whose weights :func:`divico.save_compressor` writes, keyed by a stable name."""
        return {} if compressor is None else {"compressor": compressor}

    def select(self, scores: torch.Tensor, visual: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """Keep mask: all non-visual tokens plus the top-k visual tokens of each sample (or frame).

        Parameters
        ----------
        scores
            (B, N) float32 attention of the last prompt token at layer K-1.
        visual
            (B, N) bool visual-token mask.
        groups
            (B, N) long frame/image id of each visual token (-1 elsewhere), used with ``per_frame_keep``.

        Returns
        -------
        torch.Tensor
            (B, N) bool keep mask.
        """
        if not self.config.per_frame_keep:
            keep = torch.tensor([self.config.keep_count(int(n)) for n in visual.sum(dim=1)], device=visual.device)
            return top_k_keep_mask(scores, visual, keep)
        keep_mask = ~visual
        for group in range(int(groups.max()) + 1 if groups.numel() else 0):
            in_group = groups == group
            keep = torch.tensor([self.config.keep_count(int(n)) for n in in_group.sum(dim=1)], device=visual.device)
            keep_mask |= top_k_keep_mask(scores, in_group, keep) & in_group
        return keep_mask

    def compress(
        self, hidden_states: torch.Tensor, selection: TokenSelection, compressor: nn.Module | None
    ) -> torch.Tensor:
        """Compressed hidden states.

        Parameters
        ----------
        hidden_states
            (B, N, d) input of layer K.
        selection
            Kept tokens.
        compressor
            The module from :meth:`build_compressor` (None if the method has none).

        Returns
        -------
        torch.Tensor
            (B, M, d), M = ``selection.compressed_length``; padding slots are zero.
        """
        return selection.gather(hidden_states, seq_dim=1, fill=0.0)


class InputCompressionMethod(CompressionMethod):
    """A method that shortens the visual token sequence before the LLM (every LLM layer sees fewer tokens)."""

    level: ClassVar[Literal["layer", "input"]] = "input"
    needs_scores: ClassVar[bool] = False

    def pooled_size(self, height: int, width: int) -> tuple[int, int]:
        """(h', w') a (height x width) patch grid (one image or frame) is reduced to."""
        raise TypeError(f"{type(self).__name__} must define pooled_size().")

    def pooled_grid(self, grid: "VisualGrid") -> "VisualGrid":
        """Layout of an item after compression: prefix tokens stay, each temporal slice is pooled."""
        from divico.adapters.base import VisualGrid

        height, width = self.pooled_size(grid.h, grid.w)
        return VisualGrid(grid.t, height, width, grid.prefix)

    def pool(self, cells: torch.Tensor) -> torch.Tensor:
        """Compress patch grids (n, h, w, d_vision) -> (n, h', w', d_vision) with (h', w') = :meth:`pooled_size`."""
        raise TypeError(f"{type(self).__name__} must define pool().")
