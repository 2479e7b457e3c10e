"""Base classes of compression methods (one subclass per file, registered with `@register_method`).

A method owns everything about itself: where it acts (``level``), whether it needs the engine's attention scores,
whether ``divico train`` can train it, its display name, which tokens it keeps and how it builds the compressed
sequence, its trainable parts, and its accounting — visual tokens kept, tokens each decoder layer processes and the
FLOPs it adds on top of the model (:meth:`CompressionMethod.overhead_flops`). :mod:`divico.efficiency`, ``divico
bench``, ``train`` and the demo read these through the registry and never switch on a method's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from divico.adapters.base import ModelAdapter
from divico.config import CompressionConfig
from divico.grids import VisualGrid, square_grid
from divico.selection import TokenSelection, top_k_keep_mask


@dataclass(frozen=True)
class TextShape:
    """Sizes of the LLM that a method's FLOPs depend on.

    Attributes
    ----------
    hidden_size
        d.
    num_heads
        Query heads.
    head_dim
        Features per head.
    """

    hidden_size: int
    num_heads: int
    head_dim: int


@dataclass(frozen=True)
class SelectionInputs:
    """What the engine hands :meth:`CompressionMethod.select` beyond scores, for methods with ``needs_states``.

    Passed as ``select(scores, visual, groups, states=SelectionInputs(...))``; methods without ``needs_states`` are
    called without it.

    Attributes
    ----------
    hidden_states
        (B, N, d) input of the compressing layer (layer K's input, i.e. layer K-1's output).
    normed_hidden_states
        (B, N, d) the same after the text model's final norm (what DART compares).
    keys
        (B, H_kv, N, head_dim) float32 keys of layer K-1 after its RoPE (one head block per KV head: for GQA the
        query heads share them, as ``repeat_kv`` would repeat them).
    attention_mask_2d
        (B, N) long, 1 at real tokens, 0 at left padding.
    query_positions
        (B,) long position of the last prompt token of each sample (the one before the answer under teacher
        forcing, else the last position).
    input_embeddings
        (B, N_0, d) input of decoder layer 0 for the whole prompt (N_0 = the prompt length, original positions).
    attention_rows
        With ``needs_attention_rows``: ``attention_rows(rows, row_valid)`` -> (B, R, N) mean-over-heads attention
        of the query slots ``rows`` (B, R) long (``row_valid`` (B, R) bool) at the layer before the boundary
        (:meth:`divico.scoring.LastTokenAttentionScorer.attention_rows_function`); None otherwise.
    slot_positions
        (B, N) long original prompt position of each slot of the sequence being selected from (-1 at padding
        slots added by an earlier stage); at the first boundary ``arange(N)``.

    At a later boundary of a schedule every field describes the sequence that stage selects from (N = its length),
    except ``input_embeddings``.
    """

    hidden_states: torch.Tensor
    normed_hidden_states: torch.Tensor
    keys: torch.Tensor
    attention_mask_2d: torch.Tensor
    query_positions: torch.Tensor
    input_embeddings: torch.Tensor | None = None
    attention_rows: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    slot_positions: torch.Tensor | None = None


def increasing_layers(value: Any) -> list[int] | None:
    """``value`` as a list of ints if it is a non-empty, strictly increasing list or tuple of integers >= 1 (a
    method's layer schedule in ``extra``), else None (the caller names its own rule in the error)."""
    if (not isinstance(value, (list, tuple)) or not value
            or any(isinstance(b, bool) or not isinstance(b, int) for b in value)
            or list(value) != sorted(set(value)) or value[0] < 1):
        return None
    return [int(b) for b in value]


class CompressionMethod:
    """A visual-token compression method.

    ``level="layer"`` methods act between decoder layers K-1 and K: the engine scores tokens, the method picks
    the kept set (:meth:`select`) and builds the compressed hidden states (:meth:`compress`).
    ``level="input"`` methods change the visual tokens before the LLM (see :class:`InputCompressionMethod`).

    Class attributes
    ----------------
    name
        Registry name (set by ``@register_method``).
    display_name
        Name in tables and plots (e.g. ``"FastV"``).
    level
        ``"layer"`` (acts at layer K) or ``"input"`` (before the LLM).
    needs_scores
        The engine computes the last prompt token's attention at layer K-1 for :meth:`select`.
    trainable
        ``divico train`` can train it (its modules from :meth:`trainable_modules`, LoRA, or both).
    needs_states
        The engine also passes ``states=`` :class:`SelectionInputs` (layer K's input hidden states, normed, and
        layer K-1's post-RoPE keys) to :meth:`select`; methods without it are called with three arguments.
    """

    name: ClassVar[str] = ""
    display_name: ClassVar[str] = ""
    level: ClassVar[Literal["layer", "input"]] = "layer"
    needs_scores: ClassVar[bool] = True
    trainable: ClassVar[bool] = True
    needs_states: ClassVar[bool] = False
    #: With ``needs_states``: the engine keeps every query row of the layer before each boundary and passes
    #: ``states.attention_rows`` (the attention of chosen query rows, SparseVLM's raters).
    needs_attention_rows: ClassVar[bool] = False
    #: The method accepts ``CompressionConfig.selector`` (another method's selection; DiViCo's gap encoder on it).
    takes_selector: ClassVar[bool] = False
    #: What the model's adapter must provide (:attr:`ModelAdapter.capabilities`, e.g. ``"vision_attention"``); a
    #: model whose adapter lacks one is refused by ``apply_compression`` with an error naming it.
    required_capabilities: ClassVar[frozenset[str]] = frozenset()
    #: The ``CompressionConfig.extra`` keys the method reads; any other key is refused (None: not checked here).
    extra_options: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, config: CompressionConfig) -> None:
        self.config = config
        if self.extra_options is not None:
            unknown = sorted(set(config.extra) - set(self.extra_options))
            if unknown:
                raise ValueError(f"{self.name}: unknown extra options {unknown}; valid: {list(self.extra_options)}.")

    @classmethod
    def title(cls) -> str:
        """Display name (``display_name``, else the registry name)."""
        return cls.display_name or cls.name

    # --- accounting (analytic: no model needed) ---------------------------------------------------------------
    @property
    def first_compressed_layer(self) -> int:
        """Index of the first decoder layer that sees the compressed sequence (K; 0 for input-level methods)."""
        return self.config.layer if self.level == "layer" else 0

    def compression_layers(self, num_layers: int) -> list[int]:
        """Decoder layers whose input this method compresses, ascending, for an LLM of ``num_layers`` layers.

        ``[K]`` by default (one stage). A schedule of several (PyramidDrop) makes the engine score, select and
        shorten at each: :meth:`select` is then called once per boundary on the sequence the stage before kept
        (scores, visual mask and groups of that sequence), with the keywords ``stage`` (0-based boundary index) and
        ``original_visual`` ((B, N) visual mask of the prompt).
        """
        return [self.first_compressed_layer]

    def kept_visual_tokens(self, images: int, tokens_per_image: int) -> int:
        """Visual tokens per sample after compression, for ``images`` images of ``tokens_per_image`` tokens each.

        Layer-level methods keep :meth:`CompressionConfig.keep_count` of the sample's pool (of each image with
        ``per_frame_keep``), the rule :meth:`select` applies.

        Raises
        ------
        ValueError
            If the keep count exceeds the visual tokens (nothing is silently clipped).
        """
        if self.config.per_frame_keep:
            return images * self.config.keep_count(tokens_per_image)
        return self.config.keep_count(images * tokens_per_image)

    def tokens_per_layer(self, num_layers: int, seq_len: int, visual_tokens: int, kept_visual: int) -> list[int]:
        """Tokens per sample each of the ``num_layers`` decoder layers processes in a prefill.

        Parameters
        ----------
        num_layers
            Decoder layers counted.
        seq_len
            Prompt length N before compression.
        visual_tokens, kept_visual
            Visual tokens per sample before and after compression.
        """
        first = self.first_compressed_layer
        short = seq_len - visual_tokens + kept_visual
        return [seq_len if index < first else short for index in range(num_layers)]

    def projector_tokens(self, visual_tokens: int, kept_visual: int) -> int:
        """Visual tokens the multimodal projector maps per sample (layer-level methods: all of them)."""
        return visual_tokens

    def overhead_flops(self, shape: TextShape, seq_len: int, kept_visual: int) -> dict[str, int]:
        """FLOPs per sample this method adds to a prefill, by part (``"scoring"``, ``"compressor"``, ...).

        Same convention as :mod:`divico.efficiency.flops`: matrix products only, a multiply-add = 2 FLOPs.
        The base counts the engine's scoring for methods that need scores: one (H, 1, N) product of the last
        prompt token's query with every key (``scoring="sdpa"``), or the full (H, N, N) logits of the FastV-style
        reference (``"full_attention"``), each beside the layer's own attention.

        Parameters
        ----------
        shape
            The LLM's sizes.
        seq_len
            Prompt length N before compression.
        kept_visual
            Visual tokens kept per sample.
        """
        if self.level != "layer" or not self.needs_scores:
            return {}
        per_key = 2 * shape.num_heads * shape.head_dim
        rows = 1 if self.config.scoring == "sdpa" else seq_len
        return {"scoring": per_key * rows * seq_len}

    def build_compressor(self, adapter: ModelAdapter) -> nn.Module | None:
        """Trainable module this method adds to the model (attached as ``model.divico_compressor``), or None."""
        return None

    def trainable_modules(self, adapter: ModelAdapter, compressor: nn.Module | None) -> dict[str, nn.Module]:
        """Modules whose weights :func:`divico.save_compressor` writes, keyed by a stable name."""
        return {} if compressor is None else {"compressor": compressor}

    def select(self, scores: torch.Tensor, visual: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """Keep mask: all non-visual tokens plus the top-k visual tokens of each sample (or frame).

        Parameters
        ----------
        scores
            (B, N) float32 attention of the last prompt token at layer K-1.
        visual
            (B, N) bool visual-token mask.
        groups
            (B, N) long frame/image id of each visual token (-1 elsewhere), used with ``per_frame_keep``.

        Returns
        -------
        torch.Tensor
            (B, N) bool keep mask.
        """
        if not self.config.per_frame_keep:
            keep = torch.tensor([self.config.keep_count(int(n)) for n in visual.sum(dim=1)], device=visual.device)
            return top_k_keep_mask(scores, visual, keep)
        keep_mask = ~visual
        for group in range(int(groups.max()) + 1 if groups.numel() else 0):
            in_group = groups == group
            keep = torch.tensor([self.config.keep_count(int(n)) for n in in_group.sum(dim=1)], device=visual.device)
            keep_mask |= top_k_keep_mask(scores, in_group, keep) & in_group
        return keep_mask

    def compress(
        self, hidden_states: torch.Tensor, selection: TokenSelection, compressor: nn.Module | None
    ) -> torch.Tensor:
        """Compressed hidden states.

        Parameters
        ----------
        hidden_states
            (B, N, d) input of layer K.
        selection
            Kept tokens.
        compressor
            The module from :meth:`build_compressor` (None if the method has none).

        Returns
        -------
        torch.Tensor
            (B, M, d), M = ``selection.compressed_length``; padding slots are zero.
        """
        return selection.gather(hidden_states, seq_dim=1, fill=0.0)


class InputCompressionMethod(CompressionMethod):
    """A method that shortens the visual token sequence before the LLM (every LLM layer sees fewer tokens)."""

    level: ClassVar[Literal["layer", "input"]] = "input"
    needs_scores: ClassVar[bool] = False

    def kept_visual_tokens(self, images: int, tokens_per_image: int) -> int:
        """Each image's square patch grid (plus a CLS token, if any) pooled to :meth:`pooled_grid`."""
        return images * self.pooled_grid(square_grid(tokens_per_image)).size

    def projector_tokens(self, visual_tokens: int, kept_visual: int) -> int:
        """Pooling happens before the projector, which maps only the kept tokens."""
        return kept_visual

    def pooled_size(self, height: int, width: int) -> tuple[int, int]:
        """(h', w') a (height x width) patch grid (one image or frame) is reduced to."""
        raise TypeError(f"{type(self).__name__} must define pooled_size().")

    def pooled_grid(self, grid: VisualGrid) -> VisualGrid:
        """Layout of an item after compression: prefix tokens stay, each temporal slice is pooled."""
        height, width = self.pooled_size(grid.h, grid.w)
        return VisualGrid(grid.t, height, width, grid.prefix)

    def pool(self, cells: torch.Tensor) -> torch.Tensor:
        """Compress patch grids (n, h, w, d_vision) -> (n, h', w', d_vision) with (h', w') = :meth:`pooled_size`."""
        raise TypeError(f"{type(self).__name__} must define pool().")

    def register_input_hooks(self, adapter: ModelAdapter) -> list:
        """Hooks that make the model apply :meth:`pool` to every item before the LLM; handles with ``remove()``.

        The default pools the vision features before the projector (:meth:`ModelAdapter.register_feature_pooling`).
        A method that needs other inputs (the projected features, the vision tower's attention) overrides this.
        """
        return adapter.register_feature_pooling(self.pool)
