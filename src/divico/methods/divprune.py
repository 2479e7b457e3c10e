"""DivPrune (Alvar et al., CVPR 2025): max-min diversity selection of each image's visual tokens before the LLM.

Checked against the official code, github.com/vbdi/divprune, ``LLaVA/llava/model/llava_arch.py``
(``pairwise_cosine_similarity`` and ``DivPrune``, called in ``prepare_inputs_labels_for_multimodal`` with
``LAYER_INDEX=0``):

* features: the *projected* visual tokens (the LLM input embeddings of the image, after the projector);
* distance: ``1 - cosine similarity`` of every pair;
* first token: the one whose nearest other token is farthest (``topk(D, 2, largest=False).values[1]``: the
  second-smallest distance of each column, the smallest being the token to itself, then ``argmax``);
* then greedily the token whose distance to its nearest already selected token is largest (``min`` over the
  selected rows, ``argmax``; ties go to the first index, as ``torch.argmax``);
* ``round(ratio * n)`` tokens, kept in their original order (``keep_indexs.sort()``).

divico applies it per image (per temporal slice of a video: per frame), keeping ``config.keep_count`` of its cells,
to the projector's output; every LLM layer sees the shorter prompt. Positions: LLaVA-style models number the
shortened prompt contiguously, as the official LLaVA code does (its ``position_ids`` are None there; where they are
given it gathers them at the kept tokens, ``position_ids[:, keep_indexs]``); Qwen2-VL keeps every kept token's
original (t, h, w) mRoPE position and the text's (:meth:`Qwen2VLAdapter.register_projected_selection`), so decoding
continues at the uncompressed prompt's positions. Training-free.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from divico.adapters.base import ModelAdapter, gather_cells
from divico.grids import square_grid
from divico.methods.base import InputCompressionMethod, TextShape
from divico.registry import register_method


def divprune_indices(features: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of ``count`` tokens chosen by DivPrune's greedy max-min selection, in selection order.

    Parameters
    ----------
    features
        (n, d) one item's token features.
    count
        Tokens to select, in [1, n].

    Returns
    -------
    torch.Tensor
        (count,) long.
    """
    tokens = features.shape[0]
    if not 1 <= count <= tokens:
        raise ValueError(f"DivPrune selects between 1 and {tokens} tokens of this item, got {count}.")
    normed = features.float() / features.float().norm(dim=1, keepdim=True)
    distance = 1.0 - normed @ normed.T  # (n, n)
    selected = torch.empty(count, dtype=torch.long, device=features.device)
    if tokens == 1:
        return selected.zero_()
    # First pick: the token whose nearest *other* token is farthest (row 0 of the two smallest is itself).
    selected[0] = torch.argmax(torch.topk(distance, 2, dim=0, largest=False).values[1])
    nearest = distance[selected[0]].clone()  # distance of every token to its nearest selected token
    # A selected token is never picked again, also where identical tokens tie at distance 0 (e.g. LLaVA-NeXT's
    # row-end tokens) or rounding leaves a selected token's distance to itself above 0.
    nearest[selected[0]] = float("-inf")
    for step in range(1, count):
        selected[step] = torch.argmax(nearest)
        nearest = torch.minimum(nearest, distance[selected[step]])
        nearest[selected[:step + 1]] = float("-inf")
    return selected


@register_method("divprune")
class DivPrune(InputCompressionMethod):
    """Keep ``config.keep_count(h * w)`` tokens of every image / frame by max-min cosine diversity; nothing trained.

    Accounting: the projector maps every visual token (the selection reads its output), every LLM layer sees the
    shorter prompt, and the overhead is one (P, d) x (d, P) cosine product per image / frame of P tokens.
    """

    display_name = "DivPrune"
    trainable = False

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self._layout: tuple[int, int] | None = None  # (items, tokens per item) of the last kept_visual_tokens call

    def pooled_size(self, height: int, width: int) -> tuple[int, int]:
        """(1, k): the k kept tokens of a (height x width) grid as one row, k = ``config.keep_count(height * width)``.

        Raises
        ------
        ValueError
            If ``keep_tokens`` exceeds the grid.
        """
        cells = height * width
        if self.config.keep_tokens is not None and self.config.keep_tokens > cells:
            raise ValueError(
                f"keep_tokens={self.config.keep_tokens} exceeds the {cells} tokens of one {height}x{width} "
                f"image/frame grid; valid range is [1, {cells}]."
            )
        return 1, self.config.keep_count(cells)

    def select_cells(self, cells: torch.Tensor) -> torch.Tensor:
        """DivPrune on each grid.

        Parameters
        ----------
        cells
            (n, h, w, d) projected tokens of n images / frames.

        Returns
        -------
        torch.Tensor
            (n, k) long: each grid's selected cells (row-major indices), ascending (their original order).
        """
        count, height, width, dim = cells.shape
        _, keep = self.pooled_size(height, width)
        flat = cells.reshape(count, height * width, dim)
        rows = [divprune_indices(item, keep).sort().values for item in flat]
        return torch.stack(rows) if rows else torch.zeros(0, keep, dtype=torch.long, device=cells.device)

    def pool(self, cells: torch.Tensor) -> torch.Tensor:
        """(n, h, w, d) -> (n, 1, k, d): each grid's :meth:`select_cells`, in their original order."""
        return gather_cells(self.select_cells, cells)

    def register_input_hooks(self, adapter: ModelAdapter) -> list:
        """Select on the projector's output (the official code's features), not on the vision features."""
        return adapter.register_projected_selection(self.select_cells)

    # --- accounting ------------------------------------------------------------------------------------------
    def kept_visual_tokens(self, images: int, tokens_per_image: int) -> int:
        self._layout = (images, tokens_per_image)
        return super().kept_visual_tokens(images, tokens_per_image)

    def projector_tokens(self, visual_tokens: int, kept_visual: int) -> int:
        """Every visual token: the selection reads the projector's output."""
        return visual_tokens

    def overhead_flops(self, shape: TextShape, seq_len: int, kept_visual: int) -> dict[str, int]:
        """The cosine product per image: ``2 * P * P * d`` for P tokens of LLM width d.

        The layout (images, tokens per image) is the one of the last :meth:`kept_visual_tokens` call, which
        :func:`divico.efficiency.count_flops` makes just before; a CLS prefix token is not selected from.
        """
        if self._layout is None:
            raise ValueError("DivPrune.overhead_flops needs kept_visual_tokens(images, tokens_per_image) first.")
        images, tokens_per_image = self._layout
        grid = square_grid(tokens_per_image)
        cells = grid.h * grid.w
        return {"selection": images * 2 * cells * cells * shape.hidden_size}

    def trainable_modules(self, adapter: ModelAdapter, compressor: nn.Module | None) -> dict[str, nn.Module]:
        """None: the model stays as it is."""
        return {}
