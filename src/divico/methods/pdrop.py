"""PyramidDrop (Xing et al., CVPR 2025, "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid
Visual Redundancy Reduction"): the LLM in stages, each boundary keeps a share lambda of the visual tokens left.

Official code: github.com/Cooperx521/PyramidDrop, ``llava/model/modeling_llama_pdrop.py`` (``pdrop_forward``,
``pdrop_rank_drop``); LLaVA-1.5 scripts: ``--layer_list '[8,16,24]' --image_token_ratio_list "[0.5,0.25,0.125]"``.

* Boundaries: layers 8, 16 and 24 of 32 (the input of layer 8 is shortened, and so on), scaled to an LLM of L
  layers as ``floor(b * L / 32 + 1/2)`` (nearest, halves up; duplicates and layers outside [1, L-1] dropped): 7, 14,
  21 of 28; 1, 2, 3 of 4. ``CompressionConfig.extra["layers"]`` gives them explicitly; ``config.layer`` is unused.
* Stage s (1-based) keeps ``max(1, floor(n * lambda ** s))`` of a sample's n visual tokens (official: ``int(n *
  ratio_list[s])`` with ratios lambda^s; the ``max(1, .)`` keeps an image visible where the official count is 0).
  lambda is ``CompressionConfig.keep_ratio`` (the paper's default 0.5); ``keep_tokens`` is refused.
* Ranking: the last instruction token's attention (mean over heads) to the visual tokens still present.

Differences from the official code, both the engine's: the attention that ranks at boundary b is layer b-1's own
(captured while it runs, as FastV's), where the official code recomputes layer b's q/k on layer b's input; and kept
tokens keep their original RoPE positions at every stage, where the official code renumbers them 0..M-1.
"""

from __future__ import annotations

from typing import Any

import torch

from divico.config import CompressionConfig
from divico.methods.base import CompressionMethod, TextShape, increasing_layers
from divico.registry import register_method
from divico.selection import top_k_keep_mask

#: The official boundaries for a 32-layer LLM (LLaVA-1.5-7B), scaled to other depths.
DEFAULT_LAYERS_OF_32 = (8, 16, 24)
REFERENCE_DEPTH = 32
OPTIONS = ("layers",)


def scaled_layers(num_layers: int, layers_of_32: tuple[int, ...] = DEFAULT_LAYERS_OF_32) -> list[int]:
    """The official boundaries scaled to ``num_layers``: nearest layer (halves up), in [1, L-1], no duplicates."""
    scaled = [(2 * b * num_layers + REFERENCE_DEPTH) // (2 * REFERENCE_DEPTH) for b in layers_of_32]
    return sorted({layer for layer in scaled if 1 <= layer <= num_layers - 1})


def stage_count(num_visual: int, share: float, stage: int) -> int:
    """Visual tokens kept after boundary ``stage`` (1-based) of a pool of ``num_visual``: ``max(1, floor(n s^k))``."""
    if num_visual <= 0:
        return 0
    return max(1, int(num_visual * share**stage))


@register_method("pdrop")
class PyramidDrop(CompressionMethod):
    """Multi-stage top-k by last-token attention: boundary s keeps ``floor(n * keep_ratio ** s)`` visual tokens.

    Options: ``CompressionConfig(keep_ratio=lambda, extra={"layers": [b1, b2, ...]})`` (ascending boundaries in
    [1, L-1]; default the official 8/16/24 of 32 scaled to the LLM's depth). Not with ``keep_tokens`` or
    ``per_frame_keep``. Training-free; trainable only through LoRA on the LLM, like FastV.
    """

    display_name = "PyramidDrop"
    extra_options = OPTIONS

    def __init__(self, config: CompressionConfig) -> None:
        super().__init__(config)
        if config.keep_ratio is None:
            raise ValueError(
                f"pdrop keeps a share lambda of the remaining visual tokens at each stage boundary: give keep_ratio "
                f"(lambda, in (0, 1]; the paper's 0.5), not keep_tokens={config.keep_tokens!r}."
            )
        if config.per_frame_keep:
            raise ValueError(
                "pdrop ranks each sample's visual tokens as one pool; per_frame_keep=True is not supported."
            )
        layers = config.extra.get("layers")
        if layers is not None:
            parsed = increasing_layers(layers)
            if parsed is None:
                raise ValueError(
                    f"pdrop: extra['layers'] must be a non-empty, strictly increasing list of integers >= 1, got "
                    f"{layers!r}."
                )
            layers = parsed
        self.explicit_layers: list[int] | None = layers
        self.depth: int | None = None  # the LLM's depth, once the engine or the accounting has told it

    @property
    def share(self) -> float:
        """lambda: the share of the remaining visual tokens each boundary keeps."""
        assert self.config.keep_ratio is not None
        return float(self.config.keep_ratio)

    def compression_layers(self, num_layers: int) -> list[int]:
        """The stage boundaries for an LLM of ``num_layers`` layers.

        Raises
        ------
        ValueError
            If an explicit boundary is >= ``num_layers`` or the scaled default leaves none.
        """
        layers = self.explicit_layers if self.explicit_layers is not None else scaled_layers(num_layers)
        if not layers or layers[-1] > num_layers - 1:
            raise ValueError(
                f"pdrop: stage boundaries {layers} must lie in [1, {num_layers - 1}] for a {num_layers}-layer LLM."
            )
        self.depth = num_layers
        return list(layers)

    @property
    def first_compressed_layer(self) -> int:
        """The first boundary (of the explicit ``extra["layers"]``, or of the default at the depth last given to
        :meth:`compression_layers` / :meth:`tokens_per_layer`)."""
        if self.explicit_layers is not None:
            return self.explicit_layers[0]
        if self.depth is None:
            raise ValueError(
                "pdrop: the default boundaries depend on the LLM's depth; call compression_layers(num_layers) "
                "first or give CompressionConfig(extra={'layers': [...]})."
            )
        return self.compression_layers(self.depth)[0]

    def kept_visual_tokens(self, images: int, tokens_per_image: int) -> int:
        """After the last boundary; uses the depth of the last :meth:`compression_layers` call (default 3 stages)."""
        stages = len(self.explicit_layers) if self.explicit_layers is not None else (
            len(self.compression_layers(self.depth)) if self.depth is not None else len(DEFAULT_LAYERS_OF_32))
        return stage_count(images * tokens_per_image, self.share, stages)

    def stage_lengths(self, num_layers: int, seq_len: int, visual_tokens: int) -> list[int]:
        """Tokens per sample of each stage: the prompt before the first boundary, then after each."""
        layers = self.compression_layers(num_layers)
        text = seq_len - visual_tokens
        return [seq_len] + [text + stage_count(visual_tokens, self.share, s) for s in range(1, len(layers) + 1)]

    def tokens_per_layer(self, num_layers: int, seq_len: int, visual_tokens: int, kept_visual: int) -> list[int]:
        """Each layer's stage length (``kept_visual`` is implied by the schedule)."""
        layers = self.compression_layers(num_layers)
        lengths = self.stage_lengths(num_layers, seq_len, visual_tokens)
        self._last_layout = (num_layers, seq_len, visual_tokens)
        return [lengths[sum(1 for b in layers if index >= b)] for index in range(num_layers)]

    def overhead_flops(self, shape: TextShape, seq_len: int, kept_visual: int) -> dict[str, int]:
        """The scoring at every boundary: the last token's (H, 1, M) logits (``"full_attention"``: (H, M, M)) over
        the M tokens of the stage before it; M from the layout of the preceding :meth:`tokens_per_layer` call."""
        layout = getattr(self, "_last_layout", None)
        if layout is None or layout[1] != seq_len:
            raise ValueError("pdrop: overhead_flops needs the prompt layout; call tokens_per_layer(...) first.")
        num_layers, _, visual_tokens = layout
        lengths = self.stage_lengths(num_layers, seq_len, visual_tokens)[:-1]
        per_key = 2 * shape.num_heads * shape.head_dim
        rows = [1 if self.config.scoring == "sdpa" else length for length in lengths]
        return {"scoring": sum(per_key * r * length for r, length in zip(rows, lengths))}

    def select(self, scores: torch.Tensor, visual: torch.Tensor, groups: torch.Tensor, stage: int = 0,
               original_visual: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        """Keep mask over the sequence of the stage before boundary ``stage`` (0-based): the top
        ``max(1, floor(n * lambda ** (stage + 1)))`` of its visual tokens by ``scores``, n = the sample's original
        visual tokens.

        Parameters
        ----------
        scores
            (B, M) last-prompt-token attention at the layer before the boundary, over the current sequence.
        visual
            (B, M) bool: the visual tokens still present.
        groups
            (B, M) unused (one pool per sample).
        stage
            Boundary index, 0 for the first.
        original_visual
            (B, N) bool visual mask of the prompt (its counts set the kept counts); default ``visual``.
        """
        counts = (visual if original_visual is None else original_visual).sum(dim=1)
        keep = torch.tensor([stage_count(int(n), self.share, stage + 1) for n in counts], device=visual.device)
        return top_k_keep_mask(scores, visual, torch.minimum(keep, visual.sum(dim=1)))
