"""`CompressionConfig`: what to compress, how much, and where (a peft-style config dataclass)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from divico.registry import available_methods, get_method_class

ENCODER_CHOICES = ("variational", "deterministic", "none")
SCORING_CHOICES = ("sdpa", "full_attention")
#: How DiViCo's KL term reduces over the d dimensions of a kept token's Gaussian (see ``CompressionConfig``).
KL_REDUCTIONS = ("sum", "mean")
#: ``kl_reduction`` of a saved config that predates the field: every such checkpoint was trained with the mean.
LEGACY_KL_REDUCTION = "mean"
#: DiViCo's default ``selector``: the paper's top-k by the last prompt token's attention at layer K-1 (Eq. 4-5).
DEFAULT_SELECTOR = "attention"


@dataclass
class CompressionConfig:
    """How divico compresses the visual tokens of a vision-language model.

    Parameters
    ----------
    method
        Name of a registered method (see :func:`divico.available_methods`): ``"divico"``, ``"fastv"``, ``"deco"``.
    keep_ratio
        Share of each sample's visual tokens that is kept, in (0, 1]. ``k = max(1, round(keep_ratio * Nv))``
        where ``Nv`` counts all visual tokens of the sample (several images form one pool).
    keep_tokens
        Number of visual tokens kept per sample (all images of a sample form one pool). Exactly one of
        ``keep_ratio`` / ``keep_tokens`` must be given. For ``deco`` it is the target count *per image* (or frame),
        at most its patch grid's cells; DeCo pools to the near-square grid of that many cells, or of the nearest
        count that has one (e.g. 64 -> 8 x 8 but 96 -> 9 x 11 = 99 on a 24 x 24 grid; see
        :func:`divico.methods.deco.pooled_grid`), and reports the count it kept.
    layer
        K: the decoder layer whose input is compressed; layers ``< K`` see every token, layers ``>= K`` only the
        kept ones. Valid range [1, num_hidden_layers - 1]. Ignored by input-level methods (``deco``).
    encoder
        DiViCo's gap encoder g_theta: ``"variational"`` (paper default; mu and sigma, KL term),
        ``"deterministic"`` (point estimate, no KL: Fig. 8 variant b) or ``"none"`` (selection only: variant a).
    encoder_hidden_size
        Width h of g_theta's hidden layer (``Linear(2d -> h)``, GELU, ``Linear(h -> 2d)``; ``h -> d`` for the
        deterministic encoder). ``None`` (default) means ``min(d, 512)`` for an LLM of hidden size d: 512 for
        LLaVA-1.5-7B/13B (d = 4096/5120; 8.4M parameters instead of 67M at d = 4096), d itself when d <= 512. The
        paper does not fix the width; before 2026-12-01 ``None`` meant d. On the default model an 8x narrower g_theta
        changed the held-out loss by 0.004, a third of the seed-to-seed spread (docs/benchmarks.md, "DiViCo's
        overhead and g_theta's width"). Saved checkpoints record the value given here, so one saved with ``None``
        before that change has width d: write d into its ``config.json`` to load it.
    init_sigma
        sigma produced by an untrained variational encoder (its log-sigma bias starts at ``log(init_sigma)``), so
        training starts with small noise instead of N(0, 1) on the hidden states.
    scoring
        ``"sdpa"``: the last prompt token's attention row computed from captured q/k (no N x N matrix);
        ``"full_attention"``: the official FastV way (the full (B, H, N, N) attention matrix at layer K-1), kept as a
        reference for benchmarks. Both give the same scores.
    per_frame_keep
        For video inputs: keep the same share of tokens in every frame instead of one pool per sample.
    kl_reduction
        DiViCo's KL term (variational encoder): ``"sum"`` (default, the paper's Eq. 8) is, per kept token, the KL of
        its d-dimensional Gaussian N(mu, diag(sigma^2)) to N(0, I), a sum over the d dimensions, averaged over the
        kept tokens; the paper's beta = 0.02 applies to it. ``"mean"`` also averages over the d dimensions (the KL
        divided by d; beta then acts d times weaker: 576x on a d = 576 LLM, 4096x on LLaVA-1.5-7B). It sets the KL
        that training adds to the loss and that :func:`divico.last_report` reports; inference outputs do not
        depend on it. Saved configs without this field (checkpoints written before 2026-12) were trained with
        ``"mean"`` and :meth:`from_dict` reads them so.
    selector
        Which visual tokens DiViCo keeps before its gap encoder g_theta compensates for the removed ones:
        ``"attention"`` (default, the paper's top-k by the last prompt token's attention at layer K-1) or the name
        of a registered layer-level method that takes no selector itself (e.g. ``"random"``, ``"fastv"``; see
        :func:`selector_choices`), whose ``select``, ``needs_scores`` and scoring FLOPs DiViCo then uses. Only a
        method with ``takes_selector`` (``"divico"``) accepts another value; saved configs without the field read
        as ``"attention"``.
    """

    method: str = "divico"
    keep_ratio: float | None = None
    keep_tokens: int | None = None
    layer: int = 2
    encoder: Literal["variational", "deterministic", "none"] = "variational"
    encoder_hidden_size: int | None = None
    init_sigma: float = 1e-2
    scoring: Literal["sdpa", "full_attention"] = "sdpa"
    per_frame_keep: bool = False
    kl_reduction: Literal["sum", "mean"] = "sum"
    extra: dict[str, Any] = field(default_factory=dict)
    selector: str = DEFAULT_SELECTOR

    def __post_init__(self) -> None:
        if self.method not in available_methods():
            raise ValueError(f"Unknown method {self.method!r}; known methods: {', '.join(available_methods())}.")
        if (self.keep_ratio is None) == (self.keep_tokens is None):
            raise ValueError(
                "Give exactly one of keep_ratio (in (0, 1]) or keep_tokens (>= 1); got "
                f"keep_ratio={self.keep_ratio!r}, keep_tokens={self.keep_tokens!r}."
            )
        if self.keep_ratio is not None:
            if isinstance(self.keep_ratio, bool) or not isinstance(self.keep_ratio, (int, float)):
                raise TypeError(f"keep_ratio must be a number in (0, 1], got {self.keep_ratio!r}.")
            if not (0.0 < float(self.keep_ratio) <= 1.0) or math.isnan(float(self.keep_ratio)):
                raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio!r}.")
            self.keep_ratio = float(self.keep_ratio)
        if self.keep_tokens is not None:
            if isinstance(self.keep_tokens, bool) or not isinstance(self.keep_tokens, int):
                raise TypeError(f"keep_tokens must be an integer >= 1, got {self.keep_tokens!r}.")
            if self.keep_tokens < 1:
                raise ValueError(f"keep_tokens must be >= 1, got {self.keep_tokens!r}.")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise TypeError(f"layer must be an integer >= 1, got {self.layer!r}.")
        if self.layer < 1:
            raise ValueError(
                f"layer must be in [1, num_hidden_layers - 1], got {self.layer}: layer 0 must see the full sequence."
            )
        if self.encoder not in ENCODER_CHOICES:
            raise ValueError(f"encoder must be one of {ENCODER_CHOICES}, got {self.encoder!r}.")
        if self.scoring not in SCORING_CHOICES:
            raise ValueError(f"scoring must be one of {SCORING_CHOICES}, got {self.scoring!r}.")
        if self.encoder_hidden_size is not None and self.encoder_hidden_size < 1:
            raise ValueError(f"encoder_hidden_size must be >= 1 or None, got {self.encoder_hidden_size!r}.")
        if self.kl_reduction not in KL_REDUCTIONS:
            raise ValueError(f"kl_reduction must be one of {KL_REDUCTIONS}, got {self.kl_reduction!r}.")
        if not (self.init_sigma > 0.0):
            raise ValueError(f"init_sigma must be > 0, got {self.init_sigma!r}.")
        self._check_selector()

    def _check_selector(self) -> None:
        valid = selector_choices()
        if self.selector not in valid:
            raise ValueError(
                f"selector must be {DEFAULT_SELECTOR!r} or a registered layer-level method that takes no selector "
                f"itself; got {self.selector!r}; valid: {', '.join(valid)}."
            )
        if self.selector != DEFAULT_SELECTOR and not getattr(get_method_class(self.method), "takes_selector", False):
            takers = [name for name in available_methods() if getattr(get_method_class(name), "takes_selector", False)]
            raise ValueError(
                f"selector={self.selector!r} applies only to methods that take a selector ({', '.join(takers)}); "
                f"method {self.method!r} selects by itself: leave selector at {DEFAULT_SELECTOR!r}."
            )

    def keep_count(self, num_visual: int) -> int:
        """Visual tokens to keep out of ``num_visual`` (one pool): :func:`keep_count` with this config's values.

        Raises
        ------
        ValueError
            If ``keep_tokens`` exceeds ``num_visual`` (nothing is silently clipped).
        """
        return keep_count(num_visual, keep_tokens=self.keep_tokens, keep_ratio=self.keep_ratio)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CompressionConfig":
        """The config :meth:`to_dict` wrote (e.g. the ``compression`` entry of a checkpoint's ``config.json``).

        A dict without ``kl_reduction`` was saved before that field existed, when the KL was the per-dimension
        mean: it is read as ``kl_reduction="mean"`` (:data:`LEGACY_KL_REDUCTION`), so a loaded checkpoint reports
        and continues training with the KL it was trained with. Every other missing field takes its default.

        Raises
        ------
        ValueError
            On unknown fields, or invalid values (as the constructor).
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown CompressionConfig fields {unknown}; known: {sorted(known)}.")
        return cls(**{"kl_reduction": LEGACY_KL_REDUCTION, **data})

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def from_json(cls, path: str | Path) -> "CompressionConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


def selector_choices() -> list[str]:
    """Valid ``CompressionConfig.selector`` values: ``"attention"``, then every registered layer-level method that
    selects once, at layer K, and takes no selector itself, sorted.

    Excluded: methods with ``takes_selector`` (DiViCo cannot select for another) and methods with a schedule of
    several compressing layers (they override ``compression_layers``, e.g. PyramidDrop): DiViCo's gap encoder acts
    at one layer.
    """
    def single_stage(cls: type) -> bool:
        return sum("compression_layers" in vars(owner) for owner in cls.__mro__) <= 1

    methods = [name for name in available_methods()
               if getattr(get_method_class(name), "level", None) == "layer"
               and not getattr(get_method_class(name), "takes_selector", False)
               and single_stage(get_method_class(name))]
    return [DEFAULT_SELECTOR, *methods]


def keep_count(num_visual: int, keep_tokens: int | None = None, keep_ratio: float | None = None) -> int:
    """Visual tokens kept out of a pool of ``num_visual``: the one keep-count rule of divico.

    ``keep_tokens`` as given (at most ``num_visual``), or ``max(1, round(keep_ratio * num_visual))``; 0 for an
    empty pool.

    Raises
    ------
    ValueError
        If both or neither of ``keep_tokens`` / ``keep_ratio`` are given, ``keep_ratio`` is outside (0, 1], or
        ``keep_tokens`` is < 1 or exceeds ``num_visual``.
    """
    if (keep_tokens is None) == (keep_ratio is None):
        raise ValueError(
            f"Give exactly one of keep_ratio (in (0, 1]) or keep_tokens (>= 1); got keep_ratio={keep_ratio!r}, "
            f"keep_tokens={keep_tokens!r}."
        )
    if keep_ratio is not None and not 0.0 < float(keep_ratio) <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}.")
    if keep_tokens is not None and keep_tokens < 1:
        raise ValueError(f"keep_tokens must be >= 1, got {keep_tokens!r}.")
    if num_visual <= 0:
        return 0
    if keep_tokens is not None:
        if keep_tokens > num_visual:
            raise ValueError(
                f"keep_tokens={keep_tokens} exceeds the {num_visual} visual tokens of this sample; "
                f"valid range is [1, {num_visual}] (or use keep_ratio)."
            )
        return keep_tokens
    return max(1, round(float(keep_ratio) * num_visual))
