"""DiViCo (paper Sec. III, Algorithm 1): top-k selection plus a disentangled, variational estimate of the
information gap left by the removed visual tokens."""

from __future__ import annotations

import math

import torch
from torch import nn

from typing import Any

from divico.adapters.base import ModelAdapter
from divico.config import DEFAULT_SELECTOR, KL_REDUCTIONS, CompressionConfig
from divico.methods.base import CompressionMethod, TextShape
from divico.registry import get_method_class, register_method
from divico.selection import TokenSelection

#: g_theta's hidden width when ``CompressionConfig.encoder_hidden_size`` is None: ``min(d, 512)``. On a 7B LLM
#: (d = 4096) that is 8x narrower than d: 8.4M instead of 67M parameters, 1.1 instead of 8.6 GFLOPs per 64 kept
#: tokens; on the default model (d = 576) it is 512 (docs/benchmarks.md, "DiViCo's overhead and g_theta's width").
DEFAULT_MAX_ENCODER_WIDTH = 512


class GapEncoder(nn.Module):
    """g_theta: concat(v_s, v_p) (2d) -> two-layer MLP -> gap (d), with mu/sigma in the variational variant.

    The output layer starts at zero weights, so an untrained encoder at inference adds exactly zero (FastV's output).
    Inputs are cast to the encoder's own dtype and the gap is returned in the dtype of ``selected``, so a float32
    encoder (as training keeps it) runs on a bf16 model with or without autocast.

    Parameters
    ----------
    hidden_size
        d, the LLM hidden size.
    encoder_hidden_size
        Width of the hidden layer.
    variational
        True: outputs mu and log-sigma, samples ``mu + eps * sigma`` in training, uses ``mu`` in eval, and records
        the KL term. False: a point estimate (Fig. 8 variant b).
    init_sigma
        sigma of an untrained variational encoder.
    kl_reduction
        ``"sum"`` (Eq. 8: the KL of the d-dimensional Gaussian, averaged over kept tokens) or ``"mean"`` (also
        averaged over the d dimensions, i.e. divided by d); see :func:`gaussian_kl`.

    Attributes
    ----------
    last_kl
        The KL of the last forward (float32 scalar; None for the deterministic encoder).
    last_stats
        Detached float32 scalars of the last forward, logged during training: ``"gap_norm_ratio"``, the mean over
        kept tokens of ``||v_c'|| / ||v_s||`` (the gap added, v_c' = the sample in training and mu in eval, relative
        to the token it is added to), and for the variational encoder ``"sigma_mean"``, the mean of sigma over
        tokens and dimensions. Empty when no token was kept.
    """

    def __init__(
        self,
        hidden_size: int,
        encoder_hidden_size: int,
        variational: bool,
        init_sigma: float,
        kl_reduction: str = "sum",
    ) -> None:
        super().__init__()
        if kl_reduction not in KL_REDUCTIONS:
            raise ValueError(f"kl_reduction must be one of {KL_REDUCTIONS}, got {kl_reduction!r}.")
        self.hidden_size = hidden_size
        self.variational = variational
        self.kl_reduction = kl_reduction
        self.fc1 = nn.Linear(2 * hidden_size, encoder_hidden_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(encoder_hidden_size, (2 if variational else 1) * hidden_size)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)
        if variational:
            with torch.no_grad():
                self.fc2.bias[hidden_size:] = math.log(init_sigma)
        self.last_kl: torch.Tensor | None = None
        self.last_stats: dict[str, torch.Tensor] = {}

    def forward(self, selected: torch.Tensor, pooled_rest: torch.Tensor) -> torch.Tensor:
        """Predict the gap for each kept visual token.

        Parameters
        ----------
        selected
            (R, d) kept visual tokens v_s.
        pooled_rest
            (R, d) mean of the removed visual tokens of each row's sample, v_p.

        Returns
        -------
        torch.Tensor
            (R, d) gap v_c' to add to ``selected``, in ``selected``'s dtype.
        """
        weight_dtype = self.fc1.weight.dtype
        features = torch.cat([selected.to(weight_dtype), pooled_rest.to(weight_dtype)], dim=-1)
        out = self.fc2(self.act(self.fc1(features)))
        if not self.variational:
            self.last_kl = None
            self.last_stats = _gap_stats(out, selected, None)
            return out.to(selected.dtype)
        mu, log_sigma = out.split(self.hidden_size, dim=-1)
        self.last_kl = gaussian_kl(mu, log_sigma, reduction=self.kl_reduction)
        gap = mu + torch.randn_like(mu) * log_sigma.exp() if self.training else mu
        self.last_stats = _gap_stats(gap, selected, log_sigma)
        return gap.to(selected.dtype)


def _gap_stats(gap: torch.Tensor, selected: torch.Tensor, log_sigma: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """``gap_norm_ratio`` (mean over rows of ||gap|| / ||v_s||) and ``sigma_mean``, detached float32; {} for R = 0."""
    if gap.shape[0] == 0:
        return {}
    with torch.no_grad():
        gap_norm = gap.float().norm(dim=-1)
        token_norm = selected.float().norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
        stats = {"gap_norm_ratio": (gap_norm / token_norm).mean()}
        if log_sigma is not None:
            stats["sigma_mean"] = log_sigma.float().exp().mean()
    return stats


def gaussian_kl(mu: torch.Tensor, log_sigma: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """KL(N(mu, diag(sigma^2)) || N(0, I)) of each row's d-dimensional Gaussian, averaged over the R rows.

    Per row (one kept token, paper Eq. 8): ``0.5 * sum_j (mu_j^2 + sigma_j^2 - 1 - 2 log sigma_j)``, the KL of a
    diagonal Gaussian to the standard normal prior, a sum over the d dimensions. ``reduction="mean"`` divides it by
    d (the per-dimension mean, what divico computed before 2026-12: with it beta acts d times weaker than the
    paper's beta).

    Parameters
    ----------
    mu, log_sigma
        (R, d) each.
    reduction
        ``"sum"`` over dimensions (Eq. 8) or ``"mean"`` over dimensions; either way the mean over rows.

    Returns
    -------
    torch.Tensor
        float32 scalar (0 when R = 0).

    Raises
    ------
    ValueError
        If ``reduction`` is not ``"sum"`` or ``"mean"``.
    """
    if reduction not in KL_REDUCTIONS:
        raise ValueError(f"reduction must be one of {KL_REDUCTIONS}, got {reduction!r}.")
    if mu.numel() == 0:
        return mu.new_zeros((), dtype=torch.float32)
    mu, log_sigma = mu.float(), log_sigma.float()
    # The closed form as three means over all (R, d) entries (six passes instead of eight); x d for the row sum.
    per_dimension = 0.5 * (mu.square().mean() + (2 * log_sigma).exp().mean() - 1.0 - 2 * log_sigma.mean())
    return per_dimension * mu.shape[-1] if reduction == "sum" else per_dimension


@register_method("divico")
class DiViCo(CompressionMethod):
    """v_c = v_s + g_theta(concat(v_s, mean(v_r))) for each kept visual token (``encoder="none"``: selection only).

    The kept set comes from ``config.selector``: ``"attention"`` (the paper's top-k by the last prompt token's
    attention at layer K-1, :meth:`CompressionMethod.select`) or another registered layer-level method, whose
    ``select`` DiViCo calls with the engine's arguments (``needs_scores``, ``needs_states`` and
    ``needs_attention_rows`` are the selector's, so the engine scores only for a selector that reads scores); g_theta
    then compensates for the tokens that selector removed. The scoring FLOPs are the selector's, plus g_theta's.
    """

    display_name = "DiViCo"
    takes_selector = True

    def __init__(self, config: CompressionConfig) -> None:
        super().__init__(config)
        self.selector: CompressionMethod | None = None
        if config.selector != DEFAULT_SELECTOR:
            self.selector = get_method_class(config.selector)(config)
            # Instance attributes shadow the class defaults: the engine reads them from the instance.
            self.needs_scores = self.selector.needs_scores  # type: ignore[misc]
            self.needs_states = self.selector.needs_states  # type: ignore[misc]
            self.needs_attention_rows = getattr(self.selector, "needs_attention_rows", False)  # type: ignore[misc]

    def kept_visual_tokens(self, images: int, tokens_per_image: int) -> int:
        """The selector's count (the top-k rule by default)."""
        if self.selector is None:
            return super().kept_visual_tokens(images, tokens_per_image)
        return self.selector.kept_visual_tokens(images, tokens_per_image)

    def select(self, scores: torch.Tensor, visual: torch.Tensor, groups: torch.Tensor, **inputs: Any) -> torch.Tensor:
        """The selector's keep mask (the attention top-k by default); arguments as :meth:`CompressionMethod.select`."""
        if self.selector is None:
            return super().select(scores, visual, groups)
        return self.selector.select(scores, visual, groups, **inputs)

    def encoder_width(self, hidden_size: int) -> int:
        """g_theta's hidden width for an LLM of hidden size d: ``encoder_hidden_size``, else ``min(d, 512)``."""
        return self.config.encoder_hidden_size or min(hidden_size, DEFAULT_MAX_ENCODER_WIDTH)

    def overhead_flops(self, shape: TextShape, seq_len: int, kept_visual: int) -> dict[str, int]:
        """The selector's overhead (the engine's scoring for ``"attention"``), plus g_theta on the kept tokens and
        the mean of the removed ones.

        g_theta: (2d -> h) and (h -> 2d, or d for the deterministic encoder) on each of the k kept tokens. The mean
        of the removed tokens is one (1, N) x (N, d) product per sample over the whole sequence (a 0/1 weight row).
        """
        if self.selector is None:
            flops = super().overhead_flops(shape, seq_len, kept_visual)
        else:
            flops = self.selector.overhead_flops(shape, seq_len, kept_visual)
        if self.config.encoder != "none":
            d, width = shape.hidden_size, self.encoder_width(shape.hidden_size)
            out_features = 2 * d if self.config.encoder == "variational" else d
            flops["compressor"] = kept_visual * 2 * (2 * d * width + width * out_features) + 2 * seq_len * d
        return flops

    def build_compressor(self, adapter: ModelAdapter) -> nn.Module | None:
        if self.config.encoder == "none":
            return None
        hidden = adapter.hidden_size()
        return GapEncoder(
            hidden_size=hidden,
            encoder_hidden_size=self.encoder_width(hidden),
            variational=self.config.encoder == "variational",
            init_sigma=self.config.init_sigma,
            kl_reduction=self.config.kl_reduction,
        )

    def compress(
        self, hidden_states: torch.Tensor, selection: TokenSelection, compressor: nn.Module | None
    ) -> torch.Tensor:
        """FastV's gather, then ``v_s + g_theta(concat(v_s, v_p))`` at the R kept visual slots only.

        Beyond g_theta, the work is one (1, N) x (N, d) product per sample for v_p (:func:`removed_mean`), the
        (R, d) row copies that feed g_theta, and one index_put that adds the gap at its slots.
        """
        kept = selection.gather(hidden_states, seq_dim=1, fill=0.0)
        if compressor is None:
            return kept
        sample, slot = selection.kept_visual_slots
        pooled = removed_mean(hidden_states, selection.removed_visual).to(kept.dtype)
        gap = compressor(kept[sample, slot], pooled[sample])
        return kept.index_put((sample, slot), gap.to(kept.dtype), accumulate=True)


def removed_mean(hidden_states: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """v_p: per sample, the mean of the hidden states at the removed positions (zero when none was removed).

    Parameters
    ----------
    hidden_states
        (B, N, d).
    removed
        (B, N) bool.

    Returns
    -------
    torch.Tensor
        (B, d) float32, accumulated in float32: one (1, N) x (N, d) product per sample for float32 hidden states;
        for lower-precision ones a masked sum with a float32 accumulator, which never copies the sequence to
        float32. (Under autocast the product runs in the autocast dtype, as every other matmul does.)
    """
    counts = removed.sum(dim=1, keepdim=True).clamp(min=1).to(torch.float32)
    if hidden_states.dtype == torch.float32:
        total = torch.bmm(removed.to(torch.float32).unsqueeze(1), hidden_states).squeeze(1)
    else:
        total = hidden_states.masked_fill(~removed.unsqueeze(-1), 0).sum(dim=1, dtype=torch.float32)
    return total / counts
