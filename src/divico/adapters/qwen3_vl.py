"""Adapter for Qwen3-VL (`Qwen3VLForConditionalGeneration`).

``Qwen3VLMoeForConditionalGeneration`` has the same text model, attention and DeepStack code and passes every
contract check with this adapter unchanged; it is not registered only to keep the contract matrix's run time down
(adding its name to ``model_classes`` and a ``tiny_qwen3_vl(attn=attn, moe=True)`` entry to the test families
enables it).

Qwen3-VL is Qwen2-VL's layout (dynamic resolution, ``*_grid_thw``, 3-D mRoPE from ``mm_token_type_ids``,
``model.model.language_model``), so the adapter subclasses :class:`~divico.adapters.qwen2_vl.Qwen2VLAdapter`.
What differs, and where it is handled:

* q and k are RMS-normalised per head (``q_norm`` / ``k_norm``) before RoPE: the scorer captures the norms'
  outputs (:meth:`Qwen3VLAdapter.query_key_modules`).
* Interleaved mRoPE: the text model still hands every layer one (cos, sin) of shape (B, N, head_dim), so the
  engine's gathers keep each kept token's (t, h, w) rotation unchanged.
* DeepStack: ``Qwen3VLTextModel`` adds features of intermediate vision layers to the visual positions of the
  hidden states after each of its first ``len(deepstack_visual_indexes)`` decoder layers
  (``_deepstack_process``). After a layer >= K the hidden states are the compressed sequence, so the addition is
  routed to the kept visual tokens only: the visual-position mask is gathered like the hidden states and the
  features of removed tokens are dropped (:meth:`Qwen3VLAdapter.register_runtime_hooks`). Every K >= 1 works.
* Video: the processor writes each temporal patch (frame) as its own ``<t seconds><vision_start>`` placeholder
  run ``<vision_end>``, and ``get_rope_index`` gives every frame an image's positions. So every frame is one
  visual item (t = 1) for per-frame keeping and input-level methods: each run keeps its own pooled tokens.
* Input-level methods (DeCo, pooling, DivPrune, VisionZip): the DeepStack features of every image / frame are
  pooled with the very choices made on its main features (averaged over the same cells, or the same tokens
  selected / merged), so each token of the shortened prompt gets the DeepStack features of what it stands for.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.autograd import forward_ad

from divico.adapters.base import FlattenedHeadsHook, VisionAttentionStats, wrap_method_call
from divico.adapters.qwen2_vl import Qwen2VLAdapter
from divico.grids import VisualGrid, VisualLayout
from divico.registry import register_adapter


@register_adapter
class Qwen3VLAdapter(Qwen2VLAdapter):
    """Qwen3-VL: per-head q/k norms, interleaved mRoPE, DeepStack, per-frame video runs."""

    model_classes = ("Qwen3VLForConditionalGeneration",)

    def query_key_modules(self, attention: nn.Module) -> tuple[Any, Any]:
        """``q_norm`` / ``k_norm``: their outputs, flattened over heads, are q and k right before RoPE."""
        return FlattenedHeadsHook(attention.q_norm), FlattenedHeadsHook(attention.k_norm)

    def deepstack_layers(self) -> int:
        """Number of first decoder layers after which DeepStack features are added (one per vision level)."""
        return len(self.model.config.vision_config.deepstack_visual_indexes)

    # --- where the images / frames are ---------------------------------------------------------------------
    def visual_grids(
        self, input_ids: torch.Tensor | None, visual: torch.Tensor, model_inputs: Mapping[str, Any]
    ) -> VisualLayout:
        """Image items, and one item per video frame (each frame is its own placeholder run), with merged grids."""
        layout = super().visual_grids(input_ids, visual, model_inputs)
        return [(mask, [VisualGrid(1, g.h, g.w, g.prefix) for g in grids for _ in range(g.t)])
                for mask, grids in layout]

    # --- DeepStack on the compressed sequence ----------------------------------------------------------------
    def register_runtime_hooks(self, runtime: Any) -> list[Any]:
        """Route DeepStack additions after layers >= K to the kept visual tokens of the compressed sequence.

        ``_deepstack_process(hidden_states, visual_pos_masks, visual_embeds)`` adds ``visual_embeds`` (one row per
        True of the (B, N) mask, batch-major) at the mask's positions. From layer K on (``runtime.current_selection``
        is set) the hidden states are (B, M, d): the mask is gathered to the compressed slots and only the rows of
        kept visual tokens are passed, in the same order. Input-level methods shorten the prompt before the model
        builds the mask (and their pooling pools the DeepStack features), so nothing is changed for them.
        """

        def deepstack(
            original: Callable[..., torch.Tensor],
            hidden_states: torch.Tensor,
            visual_pos_masks: torch.Tensor,
            visual_embeds: torch.Tensor,
        ) -> torch.Tensor:
            selection = runtime.current_selection
            if selection is None or runtime.method.level != "layer" or selection.is_identity:
                return original(hidden_states, visual_pos_masks, visual_embeds)
            if hidden_states.shape[1] != selection.compressed_length or (
                visual_pos_masks.shape[1] != selection.original_length
            ):
                raise RuntimeError(
                    f"DeepStack addition on a compressed prefill: hidden states of length {hidden_states.shape[1]} "
                    f"and a visual mask of length {visual_pos_masks.shape[1]}, expected {selection.compressed_length} "
                    f"and {selection.original_length} (the compressed and original prompt lengths)."
                )
            visual_pos_masks = visual_pos_masks.to(selection.index.device)
            kept_rows = ~selection.removed_visual[visual_pos_masks]  # (num visual,) in the order of visual_embeds
            kept_mask = selection.gather(visual_pos_masks, seq_dim=1, fill=False)  # (B, M)
            return original(hidden_states, kept_mask, visual_embeds[kept_rows.to(visual_embeds.device)])

        return [wrap_method_call(self.text_model(), "_deepstack_process", deepstack)]

    # --- input-level methods (DeCo, pooling, DivPrune, VisionZip) --------------------------------------------
    def register_feature_pooling(self, pool: Callable[[torch.Tensor], torch.Tensor]) -> list[Any]:
        """Qwen2-VL's pooling of each item's merged tokens per frame, with the DeepStack features pooled alike."""
        return self._pool_deepstack_alike(super().register_feature_pooling, pool)

    def register_attention_pooling(
        self, pool: Callable[[torch.Tensor, VisionAttentionStats], torch.Tensor]
    ) -> list[Any]:
        """Qwen2-VL's VisionZip pooling (attention of the tower's last block), with the DeepStack features alike."""
        return self._pool_deepstack_alike(super().register_attention_pooling, pool)

    # register_projected_pooling (DivPrune) is Qwen2-VL's: it calls register_feature_pooling above.

    def _pool_deepstack_alike(
        self, register: Callable[[Callable[..., torch.Tensor]], list[Any]], pool: Callable[..., torch.Tensor]
    ) -> list[Any]:
        """Register Qwen2-VL's wrapping of ``get_image/video_features`` with a pooling that also pools DeepStack.

        Every DeepStack level of an item is pooled with the choices the pooling makes on the item's main features:
        the forward-mode derivative of ``pool`` at the main cells in the direction of the level's cells. For a
        pooling that is linear in the cells given its content-dependent choices (DeCo's and pooling's averages,
        DivPrune's selection, VisionZip's dominant selection and contextual merging) that is exactly the same
        average / selection / merge applied to the level.

        Qwen3-VL's ``get_video_features`` calls ``get_image_features``: inside a video call the wrapped image call
        passes its features through unpooled, so every item is pooled once.

        Parameters
        ----------
        register
            A Qwen2-VL registration (wraps both methods, calls its pooling once per item, in item order).
        pool
            (n, h, w, d) cells (and the registration's extra arguments) -> (n, h', w', d).
        """
        inner = self.model.model
        state: dict[str, Any] = {"nested": False, "levels": None, "item": 0}

        def around(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            if state["nested"]:
                return original(*args, **kwargs)
            state["nested"] = True
            try:
                result = original(*args, **kwargs)
            finally:
                state["nested"] = False
            levels = getattr(result, "deepstack_features", None)
            # Lists, so the pooling below can replace each item's features in place, in the result it returns.
            state["levels"] = None if levels is None else [list(level) for level in levels]
            state["item"] = 0
            if levels is not None:
                result.deepstack_features = state["levels"]
            return result

        def pool_with_deepstack(cells: torch.Tensor, *extra: Any) -> torch.Tensor:
            if state["nested"]:
                return cells  # the enclosing video call pools these features
            pooled = pool(cells, *extra)
            if state["levels"] is not None:
                item = state["item"]
                state["item"] += 1
                for level in state["levels"]:
                    direction = level[item].reshape(cells.shape).to(cells.dtype)
                    with forward_ad.dual_level():
                        pooled_dual = pool(forward_ad.make_dual(cells, direction), *extra)
                        pooled_level = forward_ad.unpack_dual(pooled_dual).tangent
                    level[item] = pooled_level.reshape(-1, level[item].shape[-1])
            return pooled

        # The DeepStack bookkeeping wraps the original methods first, so Qwen2-VL's pooling runs on its results.
        handles: list[Any] = [wrap_method_call(inner, f"get_{kind}_features", around) for kind in ("image", "video")]
        try:
            handles += register(pool_with_deepstack)
        except Exception:
            for handle in handles:
                handle.remove()
            raise
        return handles
