"""Adapter for LLaVA-NeXT (`LlavaNextForConditionalGeneration`): any-resolution images, a base grid plus tiles.

How transformers lays out one image (``LlavaNextModel.get_image_features`` / ``pack_image_features``): the vision
tower encodes the base image (the whole image at tile resolution) and every tile of the best-fitting grid of
``image_grid_pinpoints``; the projector maps each s x s grid (s = image_size / patch_size); the tiles are joined into
one mosaic, its padding rows or columns cut off (``unpad_image``) and one ``image_newline`` token is appended to every
mosaic row. In the prompt an image is therefore ``s * s`` base tokens, then ``H`` rows of ``W`` cells and a row-end
token: ``s * s + H * (W + 1)`` ``image_token_id`` placeholders. ``pixel_values`` are padded along the tile axis and
``image_sizes`` (the original (height, width)) is required: it decides the tile grid and the unpadding.

Row-end (``image_newline``) tokens, as divico treats them:

* Selection (layer-level methods: FastV, DiViCo, DART, random...): they are visual tokens of their row, scored,
  kept or dropped like the cells beside them. The pool of a sample is every image token of the sample (base grids,
  mosaics and row ends); ``keep_ratio`` counts them. With ``per_frame_keep`` the base grid and the mosaic (its row
  ends included) of every image are separate groups.
* Input-level methods: :meth:`LlavaNextAdapter.visual_grids` describes an image as two items, the base grid
  ``VisualGrid(1, s, s)`` and the mosaic's token grid ``VisualGrid(1, H, W + 1)`` whose last column is the row-end
  tokens. Methods on the projected tokens (DivPrune) select on these token grids as the LLM would see them, row
  ends included. Pooling methods (DeCo, pooling) pool the vision features *before* the projector and the row ends:
  the base grid with the method's own ``pool``; the mosaic to the method's target (a, b) for its H x (W + 1) token
  grid, keeping the row-end column as a column: the cells (joined and unpadded by transformers' own
  ``pack_image_features``, run on the vision features) are average-pooled to a x (b - 1), projected, and every
  pooled row ends with ``image_newline`` (a x b tokens, what the engine counts). So DeCo on these models is
  average pooling only (checked: another pooling operator raises), and ``b`` must be at least 2. An image whose
  grids keep every token passes unchanged (keep-all is the unmodified model). The projector also runs on the
  unpooled features (transformers projects before packing): DeCo's projector cost here is all tokens plus the
  pooled ones. VisionZip is not supported (per-tile [CLS] attention; raises).

``generate()`` encodes the images before the prefill and passes the prefill only ``mm_encoder_outputs``;
:meth:`LlavaNextAdapter.register_runtime_hooks` records ``image_sizes`` (and OneVision's ``batch_num_images``) on
the encoder's output so the prefill's layout is the same as a forward's.

The layout (H, W) of every image is measured by running the model's own ``pack_image_features`` on one-channel
dummy features, so unpadding (and LLaVA-OneVision's ``anyres_max`` downsampling) is never re-implemented here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from divico.adapters.base import wrap_method
from divico.adapters.llava import LlavaAdapter
from divico.grids import VisualGrid, VisualLayout, item_offsets
from divico.registry import register_adapter

#: Attribute of an encoder output (``mm_encoder_outputs[kind]``) holding the inputs its layout depends on.
LAYOUT_ATTRIBUTE = "divico_layout_inputs"
#: Those inputs per kind: the encoder's keyword arguments, with the positional index of each.
LAYOUT_INPUTS = {
    "image": {"image_sizes": 1, "batch_num_images": None, "vision_aspect_ratio": None,
              "vision_feature_select_strategy": None},
    "video": {"pixel_values_videos": 0},
}


def record_layout_inputs(names: Mapping[str, int | None]) -> Callable[[Any, tuple, dict], Any]:
    """A ``wrap_method`` post-function that stores the named call arguments on the encoder's output."""

    def post(result: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        recorded = {}
        for name, position in names.items():
            value = kwargs.get(name)
            if value is None and position is not None and len(args) > position:
                value = args[position]
            recorded[name] = value
        setattr(result, LAYOUT_ATTRIBUTE, recorded)
        return result

    return post


def _pooled_shape(pool: Callable[[torch.Tensor], torch.Tensor], height: int, width: int) -> torch.Size:
    """(h', w') that ``pool`` gives a (height x width) grid, read from an empty batch (no work done)."""
    return pool(torch.zeros(0, height, width, 1)).shape[1:3]


#: (rows, cells per row) of an image's tile mosaic as the LLM sees it, or None for an image without tiles (its
#: base grid and one trailing ``image_newline``).
MosaicShape = tuple[int, int] | None


@register_adapter
class LlavaNextAdapter(LlavaAdapter):
    """`LlavaNextForConditionalGeneration`: base grid + unpadded tile mosaic with one row-end token per row.

    Subclassed by the LLaVA-OneVision adapter, which shares every image mechanic here.
    """

    model_classes = ("LlavaNextForConditionalGeneration",)
    #: No vision attention for VisionZip (see :meth:`register_attention_pooling` for why).
    capabilities = frozenset()

    # --- layout ----------------------------------------------------------------------------------------------
    def tokens_per_image(self) -> int:
        raise TypeError(
            f"{type(self).__name__}: images have a resolution-dependent token count (base grid + tiles); see "
            "visual_grids()."
        )

    def tile_side(self) -> int:
        """s: tokens per side of the base grid and of every tile (``image_size // patch_size``)."""
        vision = self.model.config.vision_config
        return int(vision.image_size) // int(vision.patch_size)

    def pack_options(self, model_inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Keyword arguments of the model's ``pack_image_features`` besides features, sizes and newline."""
        strategy = model_inputs.get("vision_feature_select_strategy")
        strategy = strategy or self.model.config.vision_feature_select_strategy
        return {"vision_feature_select_strategy": strategy}

    def tiles_per_image(self, image_sizes: torch.Tensor, model_inputs: Mapping[str, Any]) -> list[int]:
        """Vision-tower inputs per image (base + tiles), as ``get_image_features`` counts them."""
        config = self.model.config
        return [
            image_size_to_num_patches(size, config.image_grid_pinpoints, int(config.vision_config.image_size))
            for size in image_sizes
        ]

    def mosaic_shapes(
        self, image_sizes: torch.Tensor, tiles: list[int], options: Mapping[str, Any]
    ) -> list[MosaicShape]:
        """(H, W) of every image's mosaic, measured with the model's own ``pack_image_features``.

        Parameters
        ----------
        image_sizes
            (num_images, 2) original (height, width).
        tiles
            Vision-tower inputs of each image (base + tiles).
        options
            :meth:`pack_options`.
        """
        inner = self.model.model
        side = self.tile_side()
        if len(tiles) != len(image_sizes):
            raise ValueError(f"{len(image_sizes)} image_sizes rows for {len(tiles)} images.")
        dummies = [torch.zeros(count, side * side, 1) for count in tiles]
        marker = torch.ones(1)  # the row-end token, told apart from the zero cells
        packed, _ = type(inner).pack_image_features(inner, dummies, image_sizes, image_newline=marker, **options)
        shapes: list[MosaicShape] = []
        for count, tokens in zip(tiles, packed):
            if count == 1:
                shapes.append(None)
                continue
            row_ends = tokens[side * side:, 0]
            rows = int(row_ends.sum())
            width = row_ends.numel() // rows - 1
            shapes.append((rows, width))
        return shapes

    def image_items(self, shapes: list[MosaicShape]) -> list[VisualGrid]:
        """Items of the given images in prompt order: base grid, then the mosaic's token grid (row ends included).

        An image without tiles is its base grid and one trailing row-end token, counted as the item's one
        non-grid token (``prefix=1``; in the prompt it follows the grid).
        """
        side = self.tile_side()
        items = []
        for shape in shapes:
            if shape is None:
                items.append(VisualGrid(1, side, side, prefix=1))
            else:
                items += [VisualGrid(1, side, side), VisualGrid(1, shape[0], shape[1] + 1)]
        return items

    def _image_grids(self, mask: torch.Tensor, model_inputs: Mapping[str, Any]) -> list[VisualGrid]:
        if not bool(mask.any()):
            return []
        source: Mapping[str, Any] = model_inputs
        if model_inputs.get("image_sizes") is None:
            # generate() encodes the images before the prefill and passes only their features: read the inputs
            # that register_runtime_hooks recorded on them.
            encoded = (model_inputs.get("mm_encoder_outputs") or {}).get("image")
            source = getattr(encoded, LAYOUT_ATTRIBUTE, None) or {}
        image_sizes = source.get("image_sizes")
        if image_sizes is None:
            raise ValueError(
                f"{type(self.model).__name__} prompts with image tokens need image_sizes (the processor's (height, "
                "width) per image) to lay out the base grid and tiles."
            )
        tiles = self.tiles_per_image(image_sizes, source)
        return self.image_items(self.mosaic_shapes(image_sizes, tiles, self.pack_options(source)))

    def visual_grids(
        self, input_ids: torch.Tensor | None, visual: torch.Tensor, model_inputs: Mapping[str, Any]
    ) -> VisualLayout:
        """One item per base grid and one per mosaic token grid (see the module docstring), from ``image_sizes``."""
        mask = visual if input_ids is None else input_ids == int(self.model.config.image_token_id)
        return [(mask, self._image_grids(mask, model_inputs))]

    def visual_groups(
        self, input_ids: torch.Tensor | None, visual: torch.Tensor, model_inputs: Mapping[str, Any]
    ) -> torch.Tensor:
        """Groups for ``per_frame_keep``: every temporal slice of every grid item is one group; an item of only
        non-grid tokens (``t == 0``, e.g. a video's trailing row-end token) joins the item before it."""
        groups = torch.full(visual.shape, -1, dtype=torch.long, device=visual.device)
        next_id = 0
        for mask, grids in self.visual_grids(input_ids, visual, model_inputs):
            item_offsets(mask, [grid.size for grid in grids])  # raises unless the items fill the mask exactly
            per_token = []
            for grid in grids:
                if grid.t == 0:
                    if next_id == 0:
                        raise ValueError(f"A visual item without a grid ({grid}) cannot come first.")
                    per_token.append(torch.full((grid.size,), next_id - 1, dtype=torch.long))
                    continue
                frame = (torch.arange(grid.size) - grid.prefix).clamp(min=0) // (grid.h * grid.w)
                per_token.append(next_id + frame)
                next_id += grid.t
            if per_token:
                groups[mask] = torch.cat(per_token).to(visual.device)
        return groups

    def register_runtime_hooks(self, runtime: Any) -> list[Any]:
        """Record the layout inputs (``image_sizes``, ...) on what ``get_image_features`` returns.

        ``generate()`` runs the encoder before the prefill and gives the prefill only ``mm_encoder_outputs``; the
        record lets :meth:`visual_grids` lay out those images.
        """
        return [wrap_method(self.model.model, "get_image_features", record_layout_inputs(LAYOUT_INPUTS["image"]))]

    # --- input-level methods ---------------------------------------------------------------------------------
    def register_projected_pooling(self, pool: Callable[[torch.Tensor], torch.Tensor]) -> list[Any]:
        """Apply ``pool`` to every item's projected token grid, row ends included, on ``pack_image_features``'s
        output (what the LLM would see)."""
        inner = self.model.model
        side = self.tile_side()

        def post(result: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
            features, _ = result
            shapes = self._shapes_of_call(args, kwargs)
            pooled = []
            for tokens, shape in zip(features, shapes):
                if self._keeps_whole(shape, pool):
                    pooled.append(tokens)
                    continue
                dim = tokens.shape[-1]
                parts = [pool(tokens[: side * side].reshape(1, side, side, dim)).reshape(-1, dim)]
                rest = tokens[side * side:]
                if shape is not None:
                    rest = pool(rest.reshape(1, shape[0], shape[1] + 1, dim)).reshape(-1, dim)
                parts.append(rest)
                pooled.append(torch.cat(parts))
            return pooled, torch.tensor([len(p) for p in pooled], device=features[0].device)

        return [wrap_method(inner, "pack_image_features", post)]

    def register_feature_pooling(self, pool: Callable[[torch.Tensor], torch.Tensor]) -> list[Any]:
        """Pool every image's vision features before the projector and the row-end tokens (module docstring).

        A pre-hook on the projector keeps its input (the vision features of every base image and tile); the wrapped
        ``pack_image_features`` replaces its result by the pooled, projected items. The projector also ran on the
        unpooled features (transformers calls it before packing); that output is discarded.
        """
        inner = self.model.model
        side = self.tile_side()
        state: dict[str, Any] = {"busy": False}

        def keep_input(module: nn.Module, args: tuple) -> None:
            if not state["busy"]:
                state["features"] = args[0]

        def post(result: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
            features = state.pop("features")
            shapes = self._shapes_of_call(args, kwargs)
            if all(self._keeps_whole(shape, pool) for shape in shapes):
                return result  # exactly the model's own tokens (its projector runs before packing)
            tiles = [int(tokens.shape[0]) for tokens in args[0]]
            image_sizes = args[1] if len(args) > 1 else kwargs["image_sizes"]
            options = {key: value for key, value in kwargs.items() if key not in ("image_newline", "image_sizes")}
            vision = list(torch.split(features, tiles))
            packed, _ = type(inner).pack_image_features(inner, vision, image_sizes, image_newline=None, **options)
            state["busy"] = True
            try:
                pooled = [own if self._keeps_whole(shape, pool) else self._pool_image(tokens, shape, pool)
                          for own, tokens, shape in zip(result[0], packed, shapes)]
            finally:
                state["busy"] = False
            return pooled, torch.tensor([len(p) for p in pooled], device=pooled[0].device)

        handles = [self.projector().register_forward_pre_hook(keep_input)]
        handles.append(wrap_method(inner, "pack_image_features", post))
        return handles

    def register_attention_pooling(self, pool: Callable[..., torch.Tensor]) -> list[Any]:
        """Not supported: VisionZip's per-tile [CLS] statistics are not laid out on the unpadded mosaic here."""
        raise TypeError(
            f"{type(self).__name__} does not support VisionZip (register_attention_pooling): its [CLS] attention is "
            "per tile, and the tiles' mosaic with row-end tokens has no single [CLS]; use deco, pooling or divprune."
        )

    def _shapes_of_call(self, args: tuple, kwargs: dict[str, Any]) -> list[MosaicShape]:
        """Mosaic shapes of the images of one ``pack_image_features(features, image_sizes, ...)`` call."""
        tiles = [int(tokens.shape[0]) for tokens in args[0]]
        image_sizes = args[1] if len(args) > 1 else kwargs["image_sizes"]
        options = {key: value for key, value in kwargs.items() if key not in ("image_newline", "image_sizes")}
        return self.mosaic_shapes(image_sizes, tiles, options)

    def _keeps_whole(self, shape: MosaicShape, pool: Callable[[torch.Tensor], torch.Tensor]) -> bool:
        """``pool`` keeps as many tokens as an image of this mosaic shape has (base grid and token grid): the image
        then passes unchanged (DivPrune would reorder identical row-end tokens; DeCo's projector ran first)."""
        side = self.tile_side()
        grids = [(side, side)] + ([] if shape is None else [(shape[0], shape[1] + 1)])
        return all(_pooled_shape(pool, h, w).numel() == h * w for h, w in grids)

    def _pool_image(self, vision: torch.Tensor, shape: MosaicShape, pool: Callable[[torch.Tensor], torch.Tensor]
                    ) -> torch.Tensor:
        """One image's LLM tokens from its packed vision features.

        Parameters
        ----------
        vision
            (s * s + H * W, d_vision): base grid, then the unpadded mosaic's cells row by row (no row ends).
        shape
            (H, W), or None for an image without tiles.

        Returns
        -------
        torch.Tensor
            (h' * w' + a * b, d_text), or (h' * w' + 1, d_text) without tiles.
        """
        side = self.tile_side()
        dim = vision.shape[-1]
        newline = self.model.model.image_newline
        base = vision[: side * side].reshape(1, side, side, dim)
        pooled_base = pool(base)
        reference = F.adaptive_avg_pool2d(base.permute(0, 3, 1, 2), pooled_base.shape[1:3]).permute(0, 2, 3, 1)
        if not torch.equal(pooled_base, reference):
            raise TypeError(
                f"{type(self).__name__} pools an image's tile mosaic around its row-end column by average pooling "
                "(DeCo, pooling); this input-level method's pool() is another operator."
            )
        parts = [self.projector()(pooled_base.reshape(1, -1, dim))[0]]
        if shape is None:
            parts.append(newline[None].to(parts[0].dtype))
            return torch.cat(parts)
        rows, width = shape
        target_rows, target_columns = _pooled_shape(pool, rows, width + 1)
        if target_columns < 2:
            raise ValueError(
                f"The {rows}x{width + 1} token grid of an image's tiles (its last column the row-end tokens) pools to "
                f"{target_rows}x{target_columns}: no column is left for the cells (valid: at least 2 columns); keep "
                "more tokens."
            )
        cells = vision[side * side:].reshape(1, rows, width, dim).permute(0, 3, 1, 2)
        pooled_cells = F.adaptive_avg_pool2d(cells, (target_rows, target_columns - 1)).permute(0, 2, 3, 1)
        projected = self.projector()(pooled_cells)[0]  # (a, b - 1, d_text)
        row_ends = newline.to(projected.dtype).expand(target_rows, 1, projected.shape[-1])
        parts.append(torch.cat([projected, row_ends], dim=1).reshape(-1, projected.shape[-1]))
        return torch.cat(parts)
