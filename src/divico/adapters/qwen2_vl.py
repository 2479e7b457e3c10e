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

from divico.adapters.base import ModelAdapter, wrap_method
from divico.grids import VisualGrid, VisualLayout
from divico.registry import register_adapter

_GRID_KEYS = {"image": "image_grid_thw", "video": "video_grid_thw"}
_TOKEN_TYPES = {"image": 1, "video": 2}  # mm_token_type_ids: 0 text, 1 image, 2 video


@register_adapter
class Qwen2VLAdapter(ModelAdapter):
    """Qwen2-VL / Qwen2.5-VL: image and video placeholders (``image_token_id`` / ``video_token_id``)."""

    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")

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

    def input_level_positions(
        self,
        original_inputs: Mapping[str, Any],
        original_ids: torch.Tensor | None,
        model_inputs: dict[str, Any],
        input_ids: torch.Tensor | None,
        selection: Any,
        pooled_layout: VisualLayout,
    ) -> torch.Tensor:
        """mRoPE positions of the pooled grids for the shortened prompt (and the model's ``rope_deltas``)."""
        if original_ids is None or input_ids is None:
            raise ValueError("DeCo on Qwen2-VL needs input_ids (not only inputs_embeds).")
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
