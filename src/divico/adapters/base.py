"""`ModelAdapter`: everything divico needs to know about one model family, and nothing else.

The engine (:mod:`divico.runtime`) is model-agnostic; an adapter tells it where the visual tokens are, which
modules are the decoder layers, how attention heads and RoPE are laid out and how masks are rebuilt. Adding a
family is one adapter file plus one `@register_adapter` line.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import nn
from transformers import masking_utils

from divico.grids import VisualGrid, VisualLayout, item_offsets, pool_grid_rows, square_grid


#: Capability of an adapter that implements :meth:`ModelAdapter.register_attention_pooling` (the vision tower's
#: attention statistics, VisionZip).
VISION_ATTENTION = "vision_attention"


class MethodWrapHandle:
    """Undo handle for :func:`wrap_method` (same ``remove()`` interface as torch hook handles)."""

    def __init__(self, owner: Any, name: str) -> None:
        self.owner = owner
        self.name = name

    def remove(self) -> None:
        self.owner.__dict__.pop(self.name, None)


def wrap_method(owner: Any, name: str, post: Callable[[Any, tuple, dict], Any]) -> MethodWrapHandle:
    """Post-process the result of ``owner.name(...)`` with ``post(result, args, kwargs)``.

    Used where transformers offers no module boundary to hook (e.g. Qwen2-VL splits vision features per image
    inside ``get_image_features``). The original method is called unchanged; ``remove()`` restores it.
    """
    original = getattr(owner, name)

    @functools.wraps(original)  # keeps the signature: generate() reads it to pick an encoder's arguments
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        return post(original(*args, **kwargs), args, kwargs)

    owner.__dict__[name] = wrapped
    return MethodWrapHandle(owner, name)


def wrap_method_call(owner: Any, name: str, call: Callable[..., Any]) -> MethodWrapHandle:
    """Route ``owner.name(*args, **kwargs)`` through ``call(original, *args, **kwargs)``.

    For hooks that must change a method's arguments, not only its result (e.g. Qwen3-VL's DeepStack addition,
    whose visual-position mask must match the compressed sequence). ``remove()`` restores the method.
    """
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        return call(original, *args, **kwargs)

    owner.__dict__[name] = wrapped
    return MethodWrapHandle(owner, name)


class FlattenedHeadsHook:
    """A per-head module (output (B, N, H, head_dim), e.g. a q/k RMSNorm) as the scorer's hook target.

    Forward hooks registered here see the output flattened to (B, N, H * head_dim), the layout of a q/k
    projection, so :meth:`ModelAdapter.query_key_modules` can return the norms of models that normalise q and k per
    head. The hooks must not replace the output (the scorer's only read it).
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def register_forward_hook(self, hook: Callable[[nn.Module, tuple, torch.Tensor], None]) -> Any:
        def flattened(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            hook(module, inputs, output.flatten(-2))

        return self.module.register_forward_hook(flattened)


@dataclass(frozen=True)
class AttentionLayout:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float


@dataclass
class VisionAttentionStats:
    """The vision tower's attention in the layer whose output the projector reads, for n grid rows (images / frames).

    Rows and token order match the ``(n, h, w, d)`` cells the pooling callable of
    :meth:`ModelAdapter.register_attention_pooling` receives (P = h * w).

    Attributes
    ----------
    dominance
        (n, P) float32: the [CLS] token's attention to each token, mean over heads (towers with a [CLS] token), else
        the mean attention each token receives from the tokens of its image / frame, mean over heads.
    keys
        (n, P, head_dim) float32: the layer's keys, mean over heads.
    cls
        (n, d) the [CLS] token's output of that layer, when the tower has one that is not already an LLM token of the
        item (a prefix of its grid); else None.
    has_cls
        The tower has a [CLS] token (either as ``cls`` or as the item's prefix token).
    """

    dominance: torch.Tensor
    keys: torch.Tensor
    cls: torch.Tensor | None
    has_cls: bool


def gather_cells(select: Callable[[torch.Tensor], torch.Tensor], cells: torch.Tensor) -> torch.Tensor:
    """The cells ``select`` picks of each of n grids: (n, h, w, d) -> (n, 1, k, d), in the order of its indices."""
    count, height, width, dim = cells.shape
    index = select(cells)
    flat = cells.reshape(count, height * width, dim)
    return flat.gather(1, index.unsqueeze(-1).expand(-1, -1, dim)).reshape(count, 1, index.shape[1], dim)


class ModelAdapter:
    """Base adapter for decoder-only LVLMs whose text model follows the Llama layout of transformers 5.

    Subclasses set ``model_classes`` and implement :meth:`text_model`, :meth:`visual_token_mask` and, for
    input-level methods, :meth:`projector`.
    """

    model_classes: ClassVar[tuple[str, ...]] = ()
    #: What this family provides beyond the engine's basics, checked against a method's
    #: ``required_capabilities`` before it is attached (:data:`VISION_ATTENTION`: :meth:`register_attention_pooling`).
    capabilities: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    # --- structure -------------------------------------------------------------------------------------------
    def text_model(self) -> nn.Module:
        """The decoder-only language model (has ``layers`` and ``norm``)."""
        raise TypeError(f"{type(self).__name__} does not define text_model().")

    def decoder_layers(self) -> nn.ModuleList:
        return self.text_model().layers

    def final_norm(self) -> nn.Module:
        return self.text_model().norm

    def text_config(self) -> Any:
        return self.text_model().config

    def num_layers(self) -> int:
        return len(self.decoder_layers())

    def hidden_size(self) -> int:
        return int(self.text_config().hidden_size)

    def attention(self, layer_idx: int) -> nn.Module:
        return self.decoder_layers()[layer_idx].self_attn

    def projector(self) -> nn.Module:
        """Module mapping vision features to LLM embeddings (input-level methods pool before it)."""
        raise TypeError(f"{type(self).__name__} has no projector for input-level methods.")

    # --- visual tokens ---------------------------------------------------------------------------------------
    def visual_token_ids(self) -> tuple[int, ...]:
        raise TypeError(f"{type(self).__name__} does not define visual_token_ids().")

    def visual_token_mask(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """(B, N) bool: True at visual tokens of the prompt.

        With ``inputs_embeds`` only, a position is visual when its embedding equals a visual placeholder token's
        embedding (what transformers itself does to place image features).
        """
        ids = self.visual_token_ids()
        if input_ids is not None:
            mask = torch.zeros_like(input_ids, dtype=torch.bool)
            for token_id in ids:
                mask |= input_ids == token_id
            return mask
        if inputs_embeds is None:
            raise ValueError("Neither input_ids nor inputs_embeds was given to the model.")
        embedding = self.model.get_input_embeddings()
        mask = torch.zeros(inputs_embeds.shape[:2], dtype=torch.bool, device=inputs_embeds.device)
        for token_id in ids:
            placeholder = embedding(torch.tensor(token_id, device=inputs_embeds.device))
            mask |= (inputs_embeds == placeholder).all(-1)
        return mask

    def image_grid(self) -> VisualGrid:
        """Layout of one image of a fixed-resolution model (from :meth:`tokens_per_image`)."""
        try:
            return square_grid(self.tokens_per_image())
        except ValueError as error:
            raise ValueError(f"{type(self).__name__}: {error}") from error

    def visual_grids(
        self, input_ids: torch.Tensor | None, visual: torch.Tensor, model_inputs: Mapping[str, Any]
    ) -> VisualLayout:
        """Where each image / video / frame lies among the visual tokens, with its patch grid.

        The default: every visual token belongs to an image of :meth:`image_grid` (fixed resolution).

        Parameters
        ----------
        input_ids
            (B, N) prompt ids, or None.
        visual
            (B, N) bool visual-token mask.
        model_inputs
            Keyword arguments of the top-level forward (e.g. ``image_grid_thw``).
        """
        grid = self.image_grid()
        total = int(visual.sum())
        if total % grid.size:
            raise ValueError(f"{total} visual tokens are not a whole number of images of {grid.size} tokens.")
        return [(visual, [grid] * (total // grid.size))]

    def visual_groups(
        self, input_ids: torch.Tensor | None, visual: torch.Tensor, model_inputs: Mapping[str, Any]
    ) -> torch.Tensor:
        """(B, N) long id of the frame/image of each visual token (-1 elsewhere), for ``per_frame_keep``.

        Derived from :meth:`visual_grids`: every temporal slice of every item is one group (prefix tokens join the
        item's first slice). Ids are unique over the batch.
        """
        groups = torch.full(visual.shape, -1, dtype=torch.long, device=visual.device)
        next_id = 0
        for mask, grids in self.visual_grids(input_ids, visual, model_inputs):
            item, offset = item_offsets(mask, [g.size for g in grids])
            if not grids:
                continue
            prefix = torch.tensor([g.prefix for g in grids], device=visual.device)
            frame_size = torch.tensor([g.h * g.w for g in grids], device=visual.device)
            first_group = torch.tensor([g.t for g in grids], device=visual.device).cumsum(0)
            first_group = torch.cat([first_group.new_zeros(1), first_group[:-1]]) + next_id
            frame = (offset - prefix[item]).clamp(min=0) // frame_size[item]
            groups[mask] = first_group[item] + frame
            next_id += sum(g.t for g in grids)
        return groups

    # --- attention internals ---------------------------------------------------------------------------------
    def query_key_modules(self, attention: nn.Module) -> tuple[nn.Module, nn.Module]:
        """Modules whose outputs are the query and key states before RoPE (after q/k norms where a model has them)."""
        if hasattr(attention, "q_norm") and hasattr(attention, "k_norm"):
            raise TypeError(f"{type(attention).__name__} normalises q/k per head; its adapter must override this.")
        return attention.q_proj, attention.k_proj

    def attention_layout(self, attention: nn.Module) -> AttentionLayout:
        config = attention.config
        num_heads = int(config.num_attention_heads)
        return AttentionLayout(
            num_heads=num_heads,
            num_kv_heads=num_heads // int(attention.num_key_value_groups),
            head_dim=int(attention.head_dim),
            scaling=float(attention.scaling),
        )

    def rope_function(self) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        """The model family's own ``apply_rotary_pos_emb`` (imported from transformers, never copied)."""
        module = type(self.attention(0)).__module__
        return __import__(module, fromlist=["apply_rotary_pos_emb"]).apply_rotary_pos_emb

    def apply_rope_to_query_key(
        self,
        attention: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        query_position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE for query (B, H, Q, hd) and key (B, Hkv, N, hd).

        ``query_position_embeddings`` are the query rows' own (cos, sin), each (B, Q, hd); without them the query
        is taken to sit at the last Q positions.
        """
        rope = self.rope_function()
        cos, sin = position_embeddings
        if query_position_embeddings is None:
            q_len = query.shape[2]
            query_position_embeddings = (cos[..., -q_len:, :], sin[..., -q_len:, :])
        query, _ = rope(query, query, *query_position_embeddings)
        _, key = rope(key, key, cos, sin)
        return query, key

    def sliding_window(self, layer_idx: int) -> int | None:
        config = self.text_config()
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None and layer_types[layer_idx] == "sliding_attention":
            return int(config.sliding_window)
        return None

    # --- positions and masks ---------------------------------------------------------------------------------
    def gather_position_embeddings(
        self, position_embeddings: tuple[torch.Tensor, torch.Tensor], gather: Callable[..., torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather (cos, sin), each (..., B or 1, N, head_dim), at the kept positions."""
        cos, sin = position_embeddings
        return gather(cos, seq_dim=-2), gather(sin, seq_dim=-2)

    def gather_position_ids(self, position_ids: torch.Tensor, gather: Callable[..., torch.Tensor]) -> torch.Tensor:
        """Gather position ids, (..., B or 1, N), at the kept positions."""
        return gather(position_ids, seq_dim=-1)

    def layer_mask_type(self, layer_idx: int) -> str:
        layer_types = getattr(self.text_config(), "layer_types", None)
        return "full_attention" if layer_types is None else str(layer_types[layer_idx])

    def build_mask(
        self,
        mask_type: str,
        hidden_states: torch.Tensor,
        attention_mask_2d: torch.Tensor | None,
        cache: Any,
        layer_idx: int,
    ) -> Any:
        """Causal mask for a compressed sequence, sized from layer ``layer_idx``'s cache.

        ``position_ids`` is deliberately not passed: non-contiguous kept positions would be read as packed
        sequences and give a wrong mask.
        """
        builder = (
            masking_utils.create_sliding_window_causal_mask
            if mask_type == "sliding_attention"
            else masking_utils.create_causal_mask
        )
        return builder(
            config=self.text_config(),
            inputs_embeds=hidden_states,
            attention_mask=attention_mask_2d,
            cache=cache,
            position_ids=None,
            layer_idx=layer_idx,
        )

    # --- input-level methods ---------------------------------------------------------------------------------
    def tokens_per_image(self) -> int:
        """Visual placeholder tokens per image in the prompt (fixed-resolution models)."""
        raise TypeError(f"{type(self).__name__} does not define tokens_per_image().")

    def register_feature_pooling(self, pool: Callable[[torch.Tensor], torch.Tensor]) -> list[Any]:
        """Make the model pool each image's patch grid before its visual tokens reach the LLM (DeCo).

        The default pre-hook on :meth:`projector` pools (num_images, tokens, d) features laid out as
        :meth:`image_grid`. Always active: ``generate()`` encodes images before the prefill forward.

        Parameters
        ----------
        pool
            (n, h, w, d) -> (n, h', w', d).

        Returns
        -------
        list
            Handles with ``remove()``.
        """
        grid = self.image_grid()

        def pre_hook(module: nn.Module, args: tuple) -> tuple:
            return (pool_grid_rows(args[0], grid, pool),) + tuple(args[1:])

        return [self.projector().register_forward_pre_hook(pre_hook)]

    def register_projected_pooling(self, pool: Callable[[torch.Tensor], torch.Tensor]) -> list[Any]:
        """Like :meth:`register_feature_pooling`, on the projector's *output* (LLM-width tokens) instead of its input.

        For input-level methods that select by the projected tokens (DivPrune). The default forward hook on
        :meth:`projector` pools its (num_images, tokens, d) output laid out as :meth:`image_grid`.

        Parameters
        ----------
        pool
            (n, h, w, d) -> (n, h', w', d).

        Returns
        -------
        list
            Handles with ``remove()``.
        """
        grid = self.image_grid()

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            return pool_grid_rows(output, grid, pool)

        return [self.projector().register_forward_hook(hook)]

    def register_projected_selection(self, select: Callable[[torch.Tensor], torch.Tensor]) -> list[Any]:
        """Keep, of every item's projected grid (each temporal slice), the tokens ``select`` picks (DivPrune).

        The default gathers them through :meth:`register_projected_pooling` as a (1 x k) row per slice, so positions
        are assigned as for pooling (contiguous on 1-D RoPE models). A family may override it to give the kept
        tokens their original positions (Qwen2-VL's mRoPE).

        Parameters
        ----------
        select
            (n, h, w, d) -> (n, k) long: indices of the kept cells of each grid (row-major), ascending.

        Returns
        -------
        list
            Handles with ``remove()``.
        """
        return self.register_projected_pooling(functools.partial(gather_cells, select))

    def register_attention_pooling(
        self, pool: Callable[[torch.Tensor, VisionAttentionStats], torch.Tensor]
    ) -> list[Any]:
        """Like :meth:`register_feature_pooling`, with the vision tower's attention statistics (VisionZip).

        Captures the query/key projections of the vision layer the projector reads (so the tower may run SDPA) and
        calls ``pool(cells, stats)`` on the vision features before the projector, (n, h, w, d) -> (n, h', w', d).
        Families that support it override this; the default refuses.

        Returns
        -------
        list
            Handles with ``remove()``.
        """
        raise TypeError(
            f"{type(self).__name__} does not expose its vision tower's attention (register_attention_pooling)."
        )

    def input_level_positions(
        self,
        original_inputs: Mapping[str, Any],
        original_ids: torch.Tensor | None,
        model_inputs: dict[str, Any],
        input_ids: torch.Tensor | None,
        selection: Any,
        pooled_layout: VisualLayout,
    ) -> torch.Tensor:
        """Fix position inputs of a prompt shortened before the LLM; return each sample's decode position shift.

        ``model_inputs`` already holds the shortened ``input_ids`` / ``attention_mask``; this may set
        ``position_ids``. The default (1-D RoPE) renumbers given position ids without gaps.

        Parameters
        ----------
        original_inputs, original_ids
            Keyword arguments and (B, N) ids of the forward before shortening.
        model_inputs
            Keyword arguments of the top-level forward after shortening, edited in place.
        input_ids
            (B, M) shortened prompt ids (None when the model was given ``inputs_embeds``).
        selection
            The :class:`~divico.selection.TokenSelection` of the shortened prompt.
        pooled_layout
            :meth:`visual_grids` of the shortened prompt.

        Returns
        -------
        torch.Tensor
            (B,) long: how much smaller the next position is than in the uncompressed prompt (decode steps subtract
            it from the position ids that ``generate()`` counts on the full prompt).
        """
        removed_before = selection.removed_visual.long().cumsum(dim=1)
        if model_inputs.get("position_ids") is not None:
            model_inputs["position_ids"] = selection.gather(
                model_inputs["position_ids"] - removed_before, seq_dim=-1, fill=0
            )
        return removed_before[:, -1]

    def register_runtime_hooks(self, runtime: Any) -> list[Any]:
        """Hooks this family needs beyond the engine's, registered by ``runtime.attach`` and removed by ``detach``.

        For model code the engine's hooks do not cover (e.g. features added to the hidden states after some
        decoder layers, or masks built from per-token type ids): such a hook reads the prefill's kept tokens from
        ``runtime.current_selection``. Returns handles with ``.remove()``; none by default.
        """
        return []

    def pad_token_id(self) -> int:
        for config in (self.model.config, self.text_config()):
            value = getattr(config, "pad_token_id", None)
            if value is not None:
                return int(value)
        return 0
