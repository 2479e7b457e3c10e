"""`CompressionReport`: what the last prefill of a compressed model did."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class CompressionReport:
    """Record of one compressed prefill.

    Attributes
    ----------
    method
        Registered method name.
    layer
        K, the first decoder layer that sees the compressed sequence (0 for input-level methods such as DeCo).
    visual_positions
        (B, Nv_max) long: positions of the visual tokens in the prompt, right-padded with -1 where a sample has
        fewer visual tokens.
    scores
        (B, Nv_max) float32: selection score of each visual token (attention of the last prompt token at layer K-1,
        mean over heads); NaN where padded or where the method does not score (DeCo).
    kept_positions
        (B, k_max) long: sorted prompt positions of the kept visual tokens, right-padded with -1.
    num_visual
        (B,) visual tokens per sample before compression.
    num_kept
        (B,) visual tokens per sample after compression: the count really kept (DeCo may pool to a near-square
        count next to its target, see :func:`divico.methods.deco.pooled_grid`).
    seq_len_before, seq_len_after
        Sequence length (padded batch) entering layer K before and after compression.
    kl
        DiViCo's KL term of this forward, float32 (None for methods without one): by default Eq. 8, per kept token
        the KL of its d-dimensional Gaussian summed over dimensions, averaged over the kept tokens of the batch;
        divided by d with ``CompressionConfig(kl_reduction="mean")``.
    """

    method: str
    layer: int
    visual_positions: torch.Tensor
    scores: torch.Tensor
    kept_positions: torch.Tensor
    num_visual: torch.Tensor
    num_kept: torch.Tensor
    seq_len_before: int
    seq_len_after: int
    kl: torch.Tensor | None = None
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def compression_ratio(self) -> float:
        """Share of visual tokens removed over the batch, in [0, 1)."""
        total = int(self.num_visual.sum())
        return 0.0 if total == 0 else 1.0 - int(self.num_kept.sum()) / total
