"""Pooling: training-free 2-D average pooling of each image's patch grid before the LLM (DeCo, projector as is).

Benchmark studies of token reduction (UniPruneBench, VTC-Bench) find plain pooling a strong baseline that most
papers omit. The pooling is DeCo's (:class:`divico.methods.deco.AdaptiveAveragePooling`: near-square grids from
:func:`divico.methods.deco.pooled_grid`), applied like DeCo's to the vision features *before* the projector, which
then maps only the pooled tokens; nothing is trained, so the projector sees averaged features it was not trained on.
"""

from __future__ import annotations

from torch import nn

from divico.adapters.base import ModelAdapter
from divico.methods.deco import AdaptiveAveragePooling
from divico.registry import register_method


@register_method("pooling")
class AveragePooling(AdaptiveAveragePooling):
    """Pool the patch grid of every image (every frame of a video) to a near-square h' x w' grid; nothing trained.

    The accounting is DeCo's: each image's grid pooled (:meth:`kept_visual_tokens`), every LLM layer on the short
    sequence, the projector on the pooled tokens only, and no overhead beyond the pooling itself (averages, no
    matrix products).
    """

    display_name = "Pooling"
    trainable = False

    def trainable_modules(self, adapter: ModelAdapter, compressor: nn.Module | None) -> dict[str, nn.Module]:
        """None: the projector and the LLM stay as they are (LoRA, if the model has one, is saved on its own)."""
        return {}
