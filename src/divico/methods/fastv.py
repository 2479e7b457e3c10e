"""FastV (Chen et al., 2024): keep the top-k visual tokens by last-token attention at layer K-1, drop the rest."""

from __future__ import annotations

from divico.methods.base import CompressionMethod
from divico.registry import register_method


@register_method("fastv")
class FastV(CompressionMethod):
    """Training-free selection; :meth:`CompressionMethod.compress` already gathers the kept tokens.

    Trainable only through LoRA on the LLM (the paper's Fig. 8 variant a).
    """

    display_name = "FastV"
