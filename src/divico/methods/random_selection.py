"""Random selection: keep k visual tokens drawn uniformly at random at layer K, drop the rest (a seeded baseline).

Benchmark studies of token reduction (UniPruneBench, VTC-Bench) find random pruning a strong baseline that most
papers omit. The draw needs no attention scores, so the engine computes none and the method adds no FLOPs.
"""

from __future__ import annotations

import torch

from divico.config import CompressionConfig
from divico.methods.base import CompressionMethod
from divico.registry import register_method

#: Seed used when ``CompressionConfig.extra`` has no ``"seed"``.
DEFAULT_SEED = 0


def random_keep_mask(visual: torch.Tensor, groups: torch.Tensor, counts: list[list[int]], seed: int) -> torch.Tensor:
    """Keep all non-visual tokens and, per pool, ``counts`` visual tokens drawn uniformly without replacement.

    Each sample draws from its own generator seeded with ``seed`` alone, over its visual tokens in prompt order
    (pool after pool), so the draw depends only on the seed and the sample's own pool sizes — not on its batch
    index, its padding or the other samples: a sample gets the same kept set in a batch and alone.

    Parameters
    ----------
    visual
        (B, N) bool visual-token mask.
    groups
        (B, N) long pool id of each visual token (0, 1, ... in prompt order; -1 elsewhere).
    counts
        ``counts[b][g]``: visual tokens to keep from pool g of sample b (one entry per pool id up to the largest).
    seed
        Seed of every sample's generator.

    Returns
    -------
    torch.Tensor
        (B, N) bool keep mask.
    """
    keep = ~visual
    for sample in range(visual.shape[0]):
        generator = torch.Generator().manual_seed(seed)
        for pool, count in enumerate(counts[sample]):
            positions = (visual[sample] & (groups[sample] == pool)).nonzero().flatten()
            if positions.numel() == 0:
                continue
            drawn = torch.randperm(positions.numel(), generator=generator)[:count].to(positions.device)
            keep[sample, positions[drawn]] = True
    return keep


@register_method("random")
class RandomSelection(CompressionMethod):
    """Keep ``config.keep_count`` visual tokens per sample (per image / frame with ``per_frame_keep``) at random.

    Options: ``CompressionConfig(extra={"seed": int})``, a seed >= 0 (default :data:`DEFAULT_SEED`); the same seed
    keeps the same tokens of a given prompt layout. Trainable only through LoRA on the LLM, like FastV. The
    inherited accounting holds: the same keep count as top-k, and no scoring FLOPs (``needs_scores = False``).
    """

    display_name = "Random"
    needs_scores = False

    def __init__(self, config: CompressionConfig) -> None:
        super().__init__(config)
        seed = config.extra.get("seed", DEFAULT_SEED)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"random: extra['seed'] must be an integer in [0, 2**63 - 1], got {seed!r}.")
        self.seed = seed

    def select(self, scores: torch.Tensor, visual: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """Keep mask: every non-visual token and a uniform random draw of each sample's (or frame's) visual tokens.

        Parameters
        ----------
        scores
            (B, N) zeros (unused: the method needs no scores).
        visual
            (B, N) bool visual-token mask.
        groups
            (B, N) long frame/image id of each visual token (-1 elsewhere), used with ``per_frame_keep``.

        Returns
        -------
        torch.Tensor
            (B, N) bool keep mask.
        """
        if self.config.per_frame_keep:
            pool_ids = groups
            pools = int(groups.max()) + 1 if groups.numel() else 0
            sizes = [[int(n) for n in (groups == pool).sum(dim=1)] for pool in range(pools)]
            counts = [[self.config.keep_count(sizes[pool][sample]) for pool in range(pools)]
                      for sample in range(visual.shape[0])]
        else:
            pool_ids = torch.where(visual, 0, -1)
            counts = [[self.config.keep_count(int(n))] for n in visual.sum(dim=1)]
        return random_keep_mask(visual, pool_ids, counts, self.seed)
