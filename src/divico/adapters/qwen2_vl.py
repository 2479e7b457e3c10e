"""Adapter for Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`).

What differs from LLaVA, and where it is handled:

* Dynamic resolution: every image / video has its own (t, h, w) patch grid (``image_grid_thw`` /
  ``video_grid_thw``); the LLM sees it merged by ``spatial_merge_size`` (m x m patches per token).
* 3-D mRoPE: the text model turns (3, B, N) position ids into one (cos, sin) of shape (B, N, head_dim), so the
  engine's default gathers keep every kept token's original (t, h, w) rotation; decode positions are unchanged.
* Sliding-window layers (``use_sliding_window`` / ``layer_types``): the base adapter rebuilds each mask type.
* DeCo: each item's merged-token grid is pooled per temporal slice after the vision tower's merger; the shortened
  prompt gets fresh mRoPE positions for the pooled grids.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from transformers.vision_utils import get_vision_window_index

from divico.adapters.base import VISION_ATTENTION, ModelAdapter, VisionAttentionStats, gather_cells, wrap_method
from divico.grids import VisualGrid, VisualLayout, item_offsets
from divico.registry import register_adapter

_GRID_KEYS = {"image": "image_grid_thw", "video": "video_grid_thw"}
_TOKEN_TYPES = {"image": 1, "video": 2}  # mm_token_type_ids: 0 text, 1 image, 2 video


@register_adapter
class Qwen2VLAdapter(ModelAdapter):
    """Qwen2-VL / Qwen2.5-VL: image and video placeholders (``image_token_id`` / ``video_token_id``)."""

    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    capabilities = frozenset({VISION_ATTENTION})

    def text_model(self) -> nn.Module:
        return self.model.model.language_model

    def projector(self) -> nn.Module:
        return self.model.model.visual.merger

    def visual_token_ids(self) -> tuple[int, ...]:
        return (int(self.model.config.image_token_id), int(self.model.config.video_token_id))

    def spatial_merge_size(self) -> int:
        return int(self.model.config.vision_config.spatial_merge_size)

    # --- where the images / videos are ---------------------------------------------------------------------
    def _kind_masks(self, input_ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
        if input_ids is None:
            raise ValueError(
                "Qwen2-VL needs input_ids (not only inputs_embeds) to tell image from video tokens for per-frame "
                "keeping and DeCo."
            )
        config = self.model.config
        return {"image": input_ids == int(config.image_token_id), "video": input_ids == int(config.video_token_id)}

    def mrope_positions(self, input_ids: torch.Tensor, model_inputs: Mapping[str, Any]) -> torch.Tensor:
        """(3, B, N) temporal / height / width position ids of the prompt, as the model computes them."""
        given = model_inputs.get("position_ids")
        if given is not None and given.dim() == 3:
            return given[-3:]  # generate() prepends a text row: (4, B, N)
        return self._rope_index(input_ids, model_inputs)[0]

    def _rope_index(
        self,
        input_ids: torch.Tensor,
        model_inputs: Mapping[str, Any],
        grids: Mapping[str, torch.Tensor | None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's own ``get_rope_index`` on ``input_ids``, optionally with replaced grids."""
        type_ids = model_inputs.get("mm_token_type_ids")
        if type_ids is None:
            type_ids = torch.zeros_like(input_ids, dtype=torch.int)
            for kind, mask in self._kind_masks(input_ids).items():
                type_ids = type_ids.masked_fill(mask, _TOKEN_TYPES[kind])
        kwargs: dict[str, Any] = {
            "mm_token_type_ids": type_ids,
            "attention_mask": model_inputs.get("attention_mask"),
            "image_grid_thw": model_inputs.get("image_grid_thw"),
            "video_grid_thw": model_inputs.get("video_grid_thw"),
        }
        if grids is not None:
            kwargs.update({_GRID_KEYS[kind]: value for kind, value in grids.items()})
        if model_inputs.get("second_per_grid_ts") is not None:  # Qwen2.5-VL video timing
            kwargs["second_per_grid_ts"] = model_inputs["second_per_grid_ts"]
        if kwargs["image_grid_thw"] is None and kwargs["video_grid_thw"] is None:
            raise ValueError("Qwen2-VL visual tokens need image_grid_thw / video_grid_thw (or 3-D position_ids).")
        return self.model.model.get_rope_index(input_ids, **kwargs)

    def visual_grids(
        self, input_ids: torch.Tensor | None, visual: torch.Tensor, model_inputs: Mapping[str, Any]
    ) -> VisualLayout:
        """Image and video items with their merged-token grids (t, h / m, w / m).

        From ``image_grid_thw`` / ``video_grid_thw`` when given; ``generate()`` consumes those before the prefill
        forward, so otherwise each item's extent is read from its 3-D mRoPE positions.
        """
        merge = self.spatial_merge_size()
        masks = self._kind_masks(input_ids)
        layout: VisualLayout = []
        positions: torch.Tensor | None = None
        for kind, mask in masks.items():
            thw = model_inputs.get(_GRID_KEYS[kind])
            if thw is not None:
                grids = [VisualGrid(int(t), int(h) // merge, int(w) // merge) for t, h, w in thw.tolist()]
            elif not bool(mask.any()):
                grids = []
            else:
                assert input_ids is not None
                positions = self.mrope_positions(input_ids, model_inputs) if positions is None else positions
                grids = _grids_from_positions(mask, positions)
            layout.append((mask, grids))
        return layout

    # --- DeCo ----------------------------------------------------------------------------------------------
    def register_feature_pooling(self, pool: Callable[[torch.Tensor], torch.Tensor]) -> list[Any]:
        """Pool each item's merged tokens per temporal slice, on what ``get_image/video_features`` return.

        The vision tower's output is split per item by ``*_grid_thw`` inside those methods (and Qwen2.5-VL's
        merger sees window-permuted patches), so there is no module boundary with a plain grid to hook: the two
        methods are wrapped (original called unchanged, signature kept for ``generate()``).
        """
        inner = self.model.model
        merge = self.spatial_merge_size()
        handles = []
        for kind in ("image", "video"):
            method_name = f"get_{kind}_features"
            grid_key = _GRID_KEYS[kind]

            def post(result: Any, args: tuple, kwargs: dict[str, Any], grid_key: str = grid_key) -> Any:
                grid_thw = kwargs.get(grid_key, args[1] if len(args) > 1 else None)
                features = getattr(result, "pooler_output", None)
                if grid_thw is None or features is None:
                    return result
                pooled = []
                for item, (t, h, w) in zip(features, grid_thw.tolist()):
                    cells = item.reshape(t, h // merge, w // merge, item.shape[-1])
                    pooled.append(pool(cells).reshape(-1, item.shape[-1]))
                result.pooler_output = tuple(pooled)
                return result

            handles.append(wrap_method(inner, method_name, post))
        return handles

    def register_attention_pooling(
        self, pool: Callable[[torch.Tensor, VisionAttentionStats], torch.Tensor]
    ) -> list[Any]:
        """VisionZip without [CLS]: the mean attention each merged token receives in the tower's last block.

        Hooks capture the last block's ``qkv`` output, its ``cu_seqlens`` (one attention block per frame) and RoPE
        tables, and the tower's ``grid_thw``; after ``get_image/video_features`` each item's merged tokens are pooled
        per temporal slice with, per merged token, the attention its ``spatial_merge_size**2`` patches receive (mean
        over heads, queries of the frame and patches) and their pre-RoPE keys (mean over heads and patches).
        Qwen2.5-VL's window order is undone with the model's own ``get_vision_window_index``.
        """
        inner = self.model.model
        visual = inner.visual
        last = len(visual.blocks) - 1
        if last not in getattr(visual, "fullatt_block_indexes", [last]):
            raise ValueError(f"VisionZip reads the vision tower's last block ({last}), which here attends in windows.")
        attention = visual.blocks[last].attn
        captured: dict[str, Any] = {}

        def grab_grid(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            captured["grid_thw"] = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)

        def grab_attention(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            captured["cu_seqlens"] = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
            captured["rope"] = kwargs.get("position_embeddings")

        def grab_qkv(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            captured["qkv"] = output.detach()

        handles: list[Any] = [
            visual.register_forward_pre_hook(grab_grid, with_kwargs=True),
            attention.register_forward_pre_hook(grab_attention, with_kwargs=True),
            attention.qkv.register_forward_hook(grab_qkv),
        ]
        merge = self.spatial_merge_size()
        for kind in ("image", "video"):
            grid_key = _GRID_KEYS[kind]

            def post(result: Any, args: tuple, kwargs: dict[str, Any], grid_key: str = grid_key) -> Any:
                grid_thw = kwargs.get(grid_key, args[1] if len(args) > 1 else None)
                features = getattr(result, "pooler_output", None)
                if grid_thw is None or features is None:
                    return result
                dominance, keys = self._merged_token_attention(visual, attention, captured)
                pooled, offset = [], 0
                for item, (t, h, w) in zip(features, grid_thw.tolist()):
                    rows, cols = h // merge, w // merge
                    units = t * rows * cols
                    stats = VisionAttentionStats(
                        dominance=dominance[offset:offset + units].view(t, rows * cols),
                        keys=keys[offset:offset + units].view(t, rows * cols, -1), cls=None, has_cls=False,
                    )
                    offset += units
                    cells = item.reshape(t, rows, cols, item.shape[-1])
                    pooled.append(pool(cells, stats).reshape(-1, item.shape[-1]))
                result.pooler_output = tuple(pooled)
                return result

            handles.append(wrap_method(inner, f"get_{kind}_features", post))
        return handles

    def _merged_token_attention(
        self, visual: nn.Module, attention: nn.Module, captured: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(U,) attention received and (U, hd) pre-RoPE keys of the U merged tokens of the last tower run, in the
        order of ``pooler_output``."""
        if not {"qkv", "cu_seqlens", "rope", "grid_thw"} <= set(captured):
            raise RuntimeError("VisionZip: the vision tower's last block did not run before the features were read.")
        qkv, bounds = captured["qkv"], captured["cu_seqlens"].tolist()
        heads = int(attention.num_heads)
        query, key = qkv.reshape(qkv.shape[0], 3, heads, -1).permute(1, 0, 2, 3).float().unbind(0)[:2]  # (S, H, hd)
        rope = __import__(type(attention).__module__, fromlist=["apply_rotary_pos_emb_vision"])
        cos, sin = captured["rope"]
        query_rot, key_rot = rope.apply_rotary_pos_emb_vision(query, key, cos, sin)
        received = torch.empty(qkv.shape[0], dtype=torch.float32, device=qkv.device)
        for start, end in zip(bounds[:-1], bounds[1:]):
            logits = query_rot[start:end].transpose(0, 1) @ key_rot[start:end].permute(1, 2, 0)  # (H, s, s)
            probs = torch.softmax(logits * float(attention.scaling), dim=-1)
            received[start:end] = probs.mean(dim=(0, 1))
        patches = self.spatial_merge_size() ** 2
        dominance = received.view(-1, patches).mean(dim=1)
        keys = key.mean(dim=1).view(-1, patches, key.shape[-1]).mean(dim=1)
        if hasattr(visual, "fullatt_block_indexes"):  # Qwen2.5-VL: merged tokens run in window order
            window_index, _ = get_vision_window_index(
                captured["grid_thw"], spatial_merge_size=int(visual.spatial_merge_size),
                window_size=int(visual.window_size), patch_size=int(visual.patch_size),
            )
            order = torch.argsort(window_index.to(qkv.device))
            dominance, keys = dominance[order], keys[order]
        return dominance, keys

    def register_projected_selection(self, select: Callable[[torch.Tensor], torch.Tensor]) -> list[Any]:
        """Kept merged tokens with their *original* (t, h, w) mRoPE positions (text keeps its positions too).

        ``get_image/video_features`` are wrapped to keep each slice's selected tokens (indices recorded per item);
        :meth:`input_level_positions` gives the shortened prompt the original prompt's positions; a pre-hook on the
        language model, which runs after the features, puts each kept visual token's own original position in its
        slot. Decoding then continues at the uncompressed prompt's positions (shift 0, the prompt's ``rope_deltas``).
        A subclass with its own feature path (it overrides :meth:`register_feature_pooling`) gets the base
        behaviour (fresh positions of a (t, 1, k) grid).
        """
        if type(self).register_feature_pooling is not Qwen2VLAdapter.register_feature_pooling:
            return super().register_projected_selection(select)
        state = SelectionPositions()
        inner = self.model.model
        merge = self.spatial_merge_size()
        handles: list[Any] = []
        for kind in ("image", "video"):
            grid_key = _GRID_KEYS[kind]

            def post(result: Any, args: tuple, kwargs: dict[str, Any], grid_key: str = grid_key) -> Any:
                grid_thw = kwargs.get(grid_key, args[1] if len(args) > 1 else None)
                features = getattr(result, "pooler_output", None)
                if grid_thw is None or features is None:
                    return result
                kept = []
                for item, (t, h, w) in zip(features, grid_thw.tolist()):
                    cells = item.reshape(t, h // merge, w // merge, item.shape[-1])
                    index = select(cells)  # (t, k)
                    slice_start = torch.arange(t, device=index.device)[:, None] * (h // merge) * (w // merge)
                    state.kept_cells.append(index + slice_start)
                    kept.append(gather_cells(lambda _, index=index: index, cells).reshape(-1, item.shape[-1]))
                result.pooler_output = tuple(kept)
                return result

            handles.append(wrap_method(inner, f"get_{kind}_features", post))
        handles.append(self.text_model().register_forward_pre_hook(state.place, with_kwargs=True))
        self._selection_positions = state
        handles.append(_AttributeHandle(self, "_selection_positions"))
        return handles

    def register_projected_pooling(self, pool: Callable[[torch.Tensor], torch.Tensor]) -> list[Any]:
        """The merger is Qwen2-VL's projector and :meth:`register_feature_pooling` already pools its output."""
        return self.register_feature_pooling(pool)

    def input_level_positions(
        self,
        original_inputs: Mapping[str, Any],
        original_ids: torch.Tensor | None,
        model_inputs: dict[str, Any],
        input_ids: torch.Tensor | None,
        selection: Any,
        pooled_layout: VisualLayout,
    ) -> torch.Tensor:
        """mRoPE positions of the pooled grids for the shortened prompt (and the model's ``rope_deltas``); for a
        selection registered by :meth:`register_projected_selection`, the original positions."""
        if original_ids is None or input_ids is None:
            raise ValueError("DeCo on Qwen2-VL needs input_ids (not only inputs_embeds).")
        state = getattr(self, "_selection_positions", None)
        if state is not None:
            full = self.mrope_positions(original_ids, original_inputs)  # (3, B, N)
            visual = self.visual_token_mask(original_ids, None)
            state.prepare(full, self.visual_grids(original_ids, visual, original_inputs), pooled_layout)
            # Text slots now; each kept visual slot gets its own token's position once the features are known.
            model_inputs["position_ids"] = selection.gather(full, seq_dim=-1, fill=0)
            return torch.zeros(original_ids.shape[0], dtype=torch.long, device=original_ids.device)
        merge = self.spatial_merge_size()
        full_next = self.mrope_positions(original_ids, original_inputs).amax(dim=(0, 2)) + 1
        grids: dict[str, torch.Tensor | None] = {}
        for kind, (_, pooled) in zip(("image", "video"), pooled_layout):
            grids[kind] = (
                torch.tensor([[g.t, g.h * merge, g.w * merge] for g in pooled], device=input_ids.device)
                if pooled else None
            )
        positions, deltas = self._rope_index(input_ids, model_inputs, grids)
        model_inputs["position_ids"] = positions
        # Decode steps without explicit position ids continue from the shortened prompt's last position.
        self.model.model.rope_deltas = deltas
        return full_next - (positions.amax(dim=(0, 2)) + 1)


class SelectionPositions:
    """Original mRoPE positions for the kept tokens of a selection before the LLM (see
    :meth:`Qwen2VLAdapter.register_projected_selection`): filled by the prefill's top-level rewrite and the feature
    wrappers, applied by a pre-hook on the language model."""

    def __init__(self) -> None:
        self.kept_cells: list[torch.Tensor] = []  # per item, in layout order: (t, k) kept cells (offset by slice)
        self.pending: tuple[torch.Tensor, VisualLayout, VisualLayout] | None = None

    def prepare(self, full: torch.Tensor, layout: VisualLayout, compressed_layout: VisualLayout) -> None:
        # generate() may encode the images before this prefill's forward, so kept_cells may already hold them.
        self.pending = (full, layout, compressed_layout)

    def place(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        """Language-model pre-hook: each kept visual slot gets the original position of the cell it holds."""
        if self.pending is None or kwargs.get("position_ids") is None:
            return None
        full, layout, compressed_layout = self.pending
        self.pending = None
        positions = kwargs["position_ids"].clone()
        rows = positions[-3:]  # generate() may prepend a text row
        items = sum(len(grids) for _, grids in layout)
        if len(self.kept_cells) < items:
            raise RuntimeError(f"{items} visual items in the prompt but {len(self.kept_cells)} were selected.")
        cells = iter(self.kept_cells[len(self.kept_cells) - items:])  # this prompt's items are the latest
        self.kept_cells = []
        for (mask, grids), (short_mask, pooled) in zip(layout, compressed_layout):
            if not grids:
                continue
            item, offset = item_offsets(mask, [grid.size for grid in grids])
            sample, position = mask.nonzero(as_tuple=True)
            starts = position[offset == 0]  # first placeholder of each item in the original prompt
            kept = torch.cat([next(cells).flatten() for _ in grids])  # per item, slice after slice
            short_item, _ = item_offsets(short_mask, [grid.size for grid in pooled])
            short_sample, slot = short_mask.nonzero(as_tuple=True)
            rows[:, short_sample, slot] = full[:, short_sample, starts[short_item] + kept]
        return args, {**kwargs, "position_ids": positions}


class _AttributeHandle:
    """``remove()`` deletes an attribute an adapter set while hooks were registered."""

    def __init__(self, owner: Any, name: str) -> None:
        self.owner, self.name = owner, name

    def remove(self) -> None:
        self.owner.__dict__.pop(self.name, None)


def _grids_from_positions(mask: torch.Tensor, positions: torch.Tensor) -> list[VisualGrid]:
    """Items of one placeholder kind from their mRoPE positions: h and w are the spans of the height/width ids.

    Parameters
    ----------
    mask
        (B, N) bool placeholder tokens of one kind; each contiguous run is one item.
    positions
        (3, B, N) temporal / height / width position ids.
    """
    grids = []
    for row in range(mask.shape[0]):
        tokens = mask[row]
        starts = (tokens & ~torch.nn.functional.pad(tokens, (1, 0))[:-1]).nonzero().flatten().tolist()
        ends = (tokens & ~torch.nn.functional.pad(tokens, (0, 1))[1:]).nonzero().flatten().tolist()
        for start, end in zip(starts, ends):
            span = positions[:, row, start:end + 1]
            height = int(span[1].max() - span[1].min()) + 1
            width = int(span[2].max() - span[2].min()) + 1
            grids.append(VisualGrid((end + 1 - start) // (height * width), height, width))
    return grids
