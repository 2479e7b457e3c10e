"""VisionZip (Yang et al., CVPR 2025): dominant visual tokens by [CLS] attention plus contextual tokens merged from the
rest, in the vision tower, before the projector.

Checked against the official code, github.com/dvlab-research/VisionZip, ``visionzip/clip_encoder.py``
(``CLIPVisionTower_VisionZip.forward``) and ``visionzip/utils.py`` (``CLIPAttention_forward``), ``visionzip/main.py``:

* the layer read is the one the projector reads (``attentions[-2]`` / ``hidden_states[-2]`` for LLaVA-1.5);
* dominant tokens: the [CLS] token plus the patches with the largest [CLS] attention (``attn[:, :, 0, 1:]`` summed
  over heads; divico takes the mean, the same order), in their original order;
* contextual tokens: the remaining tokens' keys of that layer (mean over heads), L2-normalised; ``C`` targets at
  a uniform stride (``step = max(1, R // C)``, ``arange(0, R, step)[:C]``), every other remaining token assigned to
  its most similar target (dot product of normalised keys, ``argmax``); each contextual token is its target's
  hidden state plus the mean of the hidden states assigned to it;
* the item's tokens: ``[dominant..., contextual...]``; ``visionzip(model, dominant=54, contextual=10)`` keeps 64
  (the [CLS] among the 54).

divico keeps ``k = config.keep_count`` tokens per image / frame (its prefix [CLS] token counted when the item keeps
one, as Video-LLaVA's frames do) and splits them as the paper's three settings do (54 + 10, 108 + 20, 162 + 30 for
64, 128, 192: a 27 : 5 ratio): ``C = round(10 * k / 64)`` contextual, ``D = k - C`` dominant tokens, the [CLS]
token among them where the tower has one. An item kept whole (``k`` = all its tokens) passes unchanged.
For towers without [CLS] (Qwen2-VL) the dominance of a token is the mean attention it receives from the tokens of
its image / frame (mean over heads), and the keys are the pre-RoPE keys, per merged token (mean over its
``spatial_merge_size**2`` patches). The attention is computed from q/k captured with forward hooks, so the vision
tower keeps its kernel (SDPA). Positions: as for DeCo (contiguous on LLaVA-style models; on Qwen2-VL fresh mRoPE
positions of a (t, 1, k) grid per item). Training-free.
"""

from __future__ import annotations

import torch
from torch import nn

from divico.adapters.base import VISION_ATTENTION, ModelAdapter, VisionAttentionStats
from divico.grids import VisualGrid, square_grid
from divico.methods.base import InputCompressionMethod
from divico.registry import register_method

#: The paper's default split of 64 tokens: 54 dominant ([CLS] included) + 10 contextual.
PAPER_DOMINANT, PAPER_CONTEXTUAL = 54, 10


def contextual_count(keep: int) -> int:
    """Contextual tokens of an item that keeps ``keep`` tokens: ``round(10 * keep / 64)`` (54 + 10 for 64)."""
    return round(PAPER_CONTEXTUAL * keep / (PAPER_DOMINANT + PAPER_CONTEXTUAL))


def merge_contextual(hidden: torch.Tensor, keys: torch.Tensor, count: int) -> torch.Tensor:
    """VisionZip's contextual tokens of one item from its R remaining (non-dominant) tokens.

    Parameters
    ----------
    hidden
        (R, d) the remaining tokens' features, in their original order.
    keys
        (R, hd) their keys (mean over heads).
    count
        C, contextual tokens to make, in [0, R].

    Returns
    -------
    torch.Tensor
        (C, d): each target's features plus the mean of the features of the tokens assigned to it.
    """
    remaining = hidden.shape[0]
    if count == 0:
        return hidden[:0]
    normed = keys.float() / keys.float().norm(dim=-1, keepdim=True)
    step = max(1, remaining // count)
    targets = torch.arange(0, remaining, step, device=hidden.device)[:count]
    others = torch.ones(remaining, dtype=torch.bool, device=hidden.device)
    others[targets] = False
    similarity = normed[others] @ normed[targets].T  # (R - C, C)
    assign = torch.zeros(similarity.shape, dtype=hidden.dtype, device=hidden.device)
    assign.scatter_(1, similarity.argmax(dim=1, keepdim=True), 1)
    counts = assign.sum(dim=0).clamp(min=1).unsqueeze(-1)
    return hidden[targets] + (assign.T @ hidden[others]) / counts


@register_method("visionzip")
class VisionZip(InputCompressionMethod):
    """Keep ``config.keep_count`` tokens of every image / frame: dominant by attention, contextual by merging."""

    display_name = "VisionZip"
    trainable = False
    required_capabilities = frozenset({VISION_ATTENTION})

    def item_keep(self, grid: VisualGrid) -> int:
        """LLM tokens one temporal slice of ``grid`` keeps, its prefix [CLS] token included.

        Raises
        ------
        ValueError
            If ``keep_tokens`` exceeds the slice's tokens, or leaves no patch token beside a prefix.
        """
        tokens = grid.prefix + grid.h * grid.w
        if self.config.keep_tokens is not None and self.config.keep_tokens > tokens:
            raise ValueError(
                f"keep_tokens={self.config.keep_tokens} exceeds the {tokens} tokens of one image/frame "
                f"({grid.h}x{grid.w} patches + {grid.prefix} prefix); valid range is [1, {tokens}]."
            )
        keep = self.config.keep_count(tokens)
        if keep <= grid.prefix:
            raise ValueError(
                f"VisionZip keeps {keep} token(s) of an image/frame whose {grid.prefix} [CLS] prefix token stays: no "
                f"patch token would be kept; raise keep_ratio / keep_tokens to at least {grid.prefix + 1} per item."
            )
        return keep

    def pooled_grid(self, grid: VisualGrid) -> VisualGrid:
        """(t, 1, k - prefix) plus the prefix: the kept tokens of each slice as one row."""
        return VisualGrid(grid.t, 1, self.item_keep(grid) - grid.prefix, grid.prefix)

    def kept_visual_tokens(self, images: int, tokens_per_image: int) -> int:
        return images * self.pooled_grid(square_grid(tokens_per_image)).size

    def pooled_size(self, height: int, width: int) -> tuple[int, int]:
        return 1, self.item_keep(VisualGrid(1, height, width))

    def zip(self, cells: torch.Tensor, stats: VisionAttentionStats) -> torch.Tensor:
        """VisionZip on each of n grids.

        Parameters
        ----------
        cells
            (n, h, w, d) vision features of n images / frames (their prefix [CLS], if kept, is not among them).
        stats
            The attention statistics of those rows.

        Returns
        -------
        torch.Tensor
            (n, 1, out, d): ``[CLS]`` (when ``stats.cls`` is given), the dominant patches in their original order,
            then the contextual tokens; the cells unchanged when every token is kept.
        """
        count, height, width, dim = cells.shape
        patches = height * width
        prefix = 1 if stats.has_cls and stats.cls is None else 0
        keep = self.item_keep(VisualGrid(1, height, width, prefix))
        out = keep - prefix
        if tuple(stats.dominance.shape) != (count, patches):
            raise ValueError(
                f"VisionZip: the vision layer's attention covers {tuple(stats.dominance.shape)} (rows, tokens) but the "
                f"projector's input has {count} rows of {patches} tokens; this family's tokens are not the vision "
                "layer's tokens (e.g. a pixel-shuffle connector): its adapter must map them or refuse VisionZip."
            )
        flat = cells.reshape(count, patches, dim)
        if out == patches:
            return flat.reshape(count, 1, patches, dim)
        contextual = contextual_count(keep)
        dominant = keep - contextual - (1 if stats.has_cls else 0)  # patches; the [CLS] is one of the D dominant
        rows = []
        for row in range(count):
            chosen = torch.topk(stats.dominance[row], dominant).indices.sort().values
            rest = torch.ones(patches, dtype=torch.bool, device=cells.device)
            rest[chosen] = False
            parts = [] if stats.cls is None else [stats.cls[row:row + 1].to(flat.dtype)]
            parts += [flat[row, chosen], merge_contextual(flat[row, rest], stats.keys[row, rest], contextual)]
            rows.append(torch.cat(parts))
        return torch.stack(rows).reshape(count, 1, out, dim)

    def pool(self, cells: torch.Tensor) -> torch.Tensor:
        raise TypeError("VisionZip needs the vision tower's attention: it pools through register_input_hooks.")

    def register_input_hooks(self, adapter: ModelAdapter) -> list:
        """Capture the vision layer's q/k and zip the features before the projector."""
        return adapter.register_attention_pooling(self.zip)

    def trainable_modules(self, adapter: ModelAdapter, compressor: nn.Module | None) -> dict[str, nn.Module]:
        """None: the model stays as it is."""
        return {}


def cls_tower_overhead_flops(images: int, patches: int, heads: int, head_dim: int, hidden: int, keep: int) -> int:
    """FLOPs VisionZip adds per sample in a tower with [CLS] (matrix products only, a multiply-add = 2).

    The [CLS] attention row (``2 * heads * head_dim * (1 + patches)`` per image) and, for ``C = round(10 k / 64)``
    contextual tokens made from ``R`` remaining patches, the similarity ((R - C) x hd x C) and the merge
    (C x (R - C) x d) products. ``keep`` counts the [CLS]; nothing is added for an image kept whole.
    """
    if keep >= patches:
        return images * 2 * heads * head_dim * (1 + patches)
    contextual = contextual_count(keep)
    remaining = patches - (keep - contextual - 1)
    merge = 0 if contextual == 0 else 2 * (remaining - contextual) * contextual * (head_dim + hidden)
    return images * (2 * heads * head_dim * (1 + patches) + merge)
