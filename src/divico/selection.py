"""Which tokens survive compression, and the gathers that build the compressed sequence from it.

One :class:`TokenSelection` describes, for a batch, the compressed sequence of length M as a list of original
positions per sample. Samples keep different numbers of tokens (different image counts, a sample with no image),
so shorter ones are left-padded, which matches the left padding that batched generation already uses.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass
class TokenSelection:
    """Kept tokens of a batch, laid out as a left-padded compressed sequence.

    Attributes
    ----------
    index
        (B, M) long: original position of each compressed slot (0 in new padding slots).
    valid
        (B, M) bool: the slot holds a real token (False for padding added by compression).
    kept_visual
        (B, M) bool: the slot holds a kept visual token.
    removed_visual
        (B, N) bool: visual tokens of the original sequence that were removed.
    original_length
        N, the sequence length before compression.
    """

    index: torch.Tensor
    valid: torch.Tensor
    kept_visual: torch.Tensor
    removed_visual: torch.Tensor
    original_length: int

    @classmethod
    def from_keep_mask(cls, keep: torch.Tensor, visual: torch.Tensor) -> "TokenSelection":
        """Build a selection from a boolean keep mask.

        Parameters
        ----------
        keep
            (B, N) bool, True for every token that stays (all non-visual tokens must be True).
        visual
            (B, N) bool, True at visual tokens.
        """
        if keep.shape != visual.shape or keep.dim() != 2:
            raise ValueError(f"keep and visual must both be (B, N); got {tuple(keep.shape)} and {tuple(visual.shape)}.")
        if bool((~keep & ~visual).any()):
            raise ValueError("Only visual tokens may be removed; the keep mask drops a non-visual token.")
        batch, length = keep.shape
        lengths = keep.sum(dim=1)
        width = int(lengths.max()) if batch else 0
        # Slot of each kept token: right-aligned, so shorter samples get left padding.
        slot = (width - lengths).unsqueeze(1) + keep.long().cumsum(dim=1) - 1
        rows = torch.arange(batch, device=keep.device).unsqueeze(1).expand(batch, length)
        positions = torch.arange(length, device=keep.device).unsqueeze(0).expand(batch, length)
        index = torch.zeros(batch, width, dtype=torch.long, device=keep.device)
        valid = torch.zeros(batch, width, dtype=torch.bool, device=keep.device)
        kept_visual = torch.zeros(batch, width, dtype=torch.bool, device=keep.device)
        index[rows[keep], slot[keep]] = positions[keep]
        valid[rows[keep], slot[keep]] = True
        kept_visual[rows[keep], slot[keep]] = visual[keep]
        return cls(index=index, valid=valid, kept_visual=kept_visual, removed_visual=visual & ~keep,
                   original_length=length)

    @property
    def compressed_length(self) -> int:
        return self.index.shape[1]

    @property
    def is_identity(self) -> bool:
        """True when nothing was removed and no padding was added (the compressed sequence is the original)."""
        return self.compressed_length == self.original_length and bool(self.valid.all())

    def gather(self, x: torch.Tensor, seq_dim: int = 1, fill: float | int | bool | None = None) -> torch.Tensor:
        """Gather ``x`` at the kept positions along ``seq_dim`` (batch is the dimension before it).

        One ``index_select`` of whole rows over the flattened (batch, sequence) dimensions (a row copy, not the
        element-wise ``torch.gather`` of an expanded index), plus a ``masked_fill`` only when compression added
        padding slots.

        Parameters
        ----------
        x
            Tensor with shape (..., B or 1, N, ...): a size-1 batch dimension is broadcast.
        seq_dim
            Dimension of length N.
        fill
            Value written into padding slots; ``None`` leaves whatever position 0 holds.

        Returns
        -------
        torch.Tensor
            (..., B, M, ...).
        """
        seq_dim %= x.dim()
        batch_dim = seq_dim - 1
        if batch_dim < 0:
            raise ValueError(f"seq_dim must have a batch dimension before it; got seq_dim={seq_dim} for {x.dim()}-D.")
        batch, width = self.index.shape
        if x.shape[seq_dim] != self.original_length:
            raise ValueError(f"Expected length {self.original_length} at dim {seq_dim}, got shape {tuple(x.shape)}.")
        if x.shape[batch_dim] == batch:
            flat = self._flat_index
        elif x.shape[batch_dim] == 1:
            flat = self.index.reshape(-1)  # every sample reads the one shared row
        else:
            raise ValueError(f"Expected batch size {batch} or 1 at dim {batch_dim}, got shape {tuple(x.shape)}.")
        out = x.flatten(batch_dim, seq_dim).index_select(batch_dim, flat).unflatten(batch_dim, (batch, width))
        if fill is not None and self._has_padding:
            view = [1] * x.dim()
            view[batch_dim], view[seq_dim] = batch, width
            out = out.masked_fill(~self.valid.view(view), fill)
        return out

    @functools.cached_property
    def _flat_index(self) -> torch.Tensor:
        """(B * M,) index of each compressed slot into the flattened (B * N) original sequence."""
        batch, length = self.index.shape[0], self.original_length
        offsets = torch.arange(batch, device=self.index.device).unsqueeze(1) * length
        return (self.index + offsets).reshape(-1)

    @functools.cached_property
    def _has_padding(self) -> bool:
        return not bool(self.valid.all())

    @functools.cached_property
    def kept_visual_slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sample, slot) index pair, each (R,), of the R kept visual tokens of the compressed sequence."""
        sample, slot = self.kept_visual.nonzero(as_tuple=True)
        return sample, slot

    def scatter_back(self, compressed: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """Place compressed rows back at their original positions.

        Parameters
        ----------
        compressed
            (B, M, d) values of the compressed sequence.
        base
            (B, N, d) values used at the removed positions.

        Returns
        -------
        torch.Tensor
            (B, N, d): ``base`` with the kept positions replaced (differentiable w.r.t. ``compressed``).
        """
        rows = torch.arange(self.index.shape[0], device=self.index.device).unsqueeze(1).expand_as(self.index)
        out = base.clone()
        out[rows[self.valid], self.index[self.valid]] = compressed[self.valid].to(out.dtype)
        return out

    def kept_visual_positions(self) -> torch.Tensor:
        """(B, k_max) sorted original positions of kept visual tokens, right-padded with -1."""
        return _right_padded_positions(self.index, self.kept_visual)


def _right_padded_positions(positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    counts = mask.sum(dim=1)
    width = int(counts.max()) if counts.numel() else 0
    out = torch.full((positions.shape[0], width), -1, dtype=torch.long, device=positions.device)
    for row in range(positions.shape[0]):
        values = positions[row][mask[row]]
        out[row, : values.numel()] = values
    return out


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """(B, n_max) positions where ``mask`` (B, N) is True, right-padded with -1."""
    positions = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0).expand_as(mask)
    return _right_padded_positions(positions, mask)


def top_k_keep_mask(scores: torch.Tensor, visual: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Keep all non-visual tokens and, per sample, the ``keep[b]`` highest-scoring visual tokens.

    Parameters
    ----------
    scores
        (B, N) float scores (only visual positions are read).
    visual
        (B, N) bool visual-token mask.
    keep
        (B,) long number of visual tokens to keep per sample (0 for samples without visual tokens).

    Returns
    -------
    torch.Tensor
        (B, N) bool keep mask. Ties are broken towards the earlier position (stable sort).
    """
    masked = scores.float().masked_fill(~visual, float("-inf"))
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).unsqueeze(0).expand_as(order))
    return ~visual | (rank < keep.unsqueeze(1))
