"""Adapter for LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): LLaVA-NeXT images, several images, video.

Images are laid out as in LLaVA-NeXT (:mod:`divico.adapters.llava_next`, which holds every image mechanic and the
row-end token rule): base grid, then the unpadded tile mosaic with one ``image_newline`` per row; a mosaic larger
than ``vision_aspect_ratio`` (``anyres_max_9``: 9 tiles' worth) is downsampled by the model itself, and the layout
read from the model's own ``pack_image_features`` follows it. Differences:

* Several images in one sample (``batch_num_images[i] > 1``, as the processor sets it): those images get no tiles,
  only the base grid and one trailing ``image_newline`` (an item ``VisualGrid(1, s, s, prefix=1)``).
* Video (``video_token_id``): every frame's s x s grid is projected and downsampled by the model to
  ceil(s / 2) x ceil(s / 2) (``apply_pooling``, bilinear), and one ``image_newline`` follows the whole video. A
  video is two items, ``VisualGrid(frames, s2, s2)`` and its row-end token ``VisualGrid(0, s2, s2, prefix=1)``. For
  selection the trailing token is a visual token like the others (``per_frame_keep``: it joins the last frame).
  DeCo / pooling pool each frame's vision features after the model's own bilinear downsampling (its
  ``apply_pooling``, run on the vision features) and before the projector; DivPrune selects on each frame's
  projected, downsampled grid. The trailing row-end token always stays; frames that keep every token pass unchanged.
* ``generate()`` passes the prefill no pixels: the video's frame count is recorded on ``get_video_features``'s
  output (see :meth:`LlavaNextAdapter.register_runtime_hooks`), else read from the token runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

from divico.adapters.base import wrap_method
from divico.adapters.llava_next import (
    LAYOUT_ATTRIBUTE, LAYOUT_INPUTS, LlavaNextAdapter, record_layout_inputs,
)
from divico.grids import VisualGrid, VisualLayout
from divico.registry import register_adapter


@register_adapter
class LlavaOnevisionAdapter(LlavaNextAdapter):
    """`LlavaOnevisionForConditionalGeneration`: ``image_token_id`` and ``video_token_id`` placeholders."""

    model_classes = ("LlavaOnevisionForConditionalGeneration",)

    def visual_token_ids(self) -> tuple[int, ...]:
        return (int(self.model.config.image_token_id), int(self.model.config.video_token_id))

    def pack_options(self, model_inputs: Mapping[str, Any]) -> dict[str, Any]:
        aspect = model_inputs.get("vision_aspect_ratio") or self.model.config.vision_aspect_ratio
        return {"vision_aspect_ratio": aspect}

    def tiles_per_image(self, image_sizes: torch.Tensor, model_inputs: Mapping[str, Any]) -> list[int]:
        """Base + tiles for the only image of a sample; 1 (the base alone) for images of multi-image samples."""
        config = self.model.config
        per_sample = model_inputs.get("batch_num_images")
        alone = [True] * len(image_sizes) if per_sample is None else [
            int(count) == 1 for count in per_sample for _ in range(int(count))
        ]
        if len(alone) != len(image_sizes):
            raise ValueError(
                f"batch_num_images {per_sample.tolist()} counts {len(alone)} images but image_sizes has "
                f"{len(image_sizes)} rows."
            )
        return [
            image_size_to_num_patches(size, config.image_grid_pinpoints, int(config.vision_config.image_size))
            if single else 1
            for size, single in zip(image_sizes, alone)
        ]

    def frame_side(self) -> int:
        """ceil(s / 2): tokens per side of a video frame after the model's own downsampling."""
        return -(-self.tile_side() // 2)

    def _video_grids(self, mask: torch.Tensor, model_inputs: Mapping[str, Any]) -> list[VisualGrid]:
        """Per video: its frames' grid, then its trailing row-end token."""
        side = self.frame_side()
        videos = model_inputs.get("pixel_values_videos")
        if videos is None:  # encoded by generate() before the prefill (see LlavaNextAdapter.register_runtime_hooks)
            encoded = (model_inputs.get("mm_encoder_outputs") or {}).get("video")
            videos = (getattr(encoded, LAYOUT_ATTRIBUTE, None) or {}).get("pixel_values_videos")
        if videos is not None:
            frames = [int(videos.shape[1])] * int(videos.shape[0])
        else:  # generate() passes no pixels after the prefill: one video per contiguous run of video tokens
            runs = int((mask & ~torch.nn.functional.pad(mask, (1, 0))[:, :-1]).sum())
            total = int(mask.sum())
            per_run, uneven = divmod(total, runs) if runs else (0, 0)
            count, remainder = divmod(per_run - 1, side * side) if runs else (0, 0)
            if uneven or remainder or (runs and count < 1):
                raise ValueError(
                    f"{total} video tokens in {runs} runs are not whole videos of frames x {side * side} tokens + 1."
                )
            frames = [count] * runs
        grids = []
        for count in frames:
            grids += [VisualGrid(count, side, side), VisualGrid(0, side, side, prefix=1)]
        return grids

    def visual_grids(
        self, input_ids: torch.Tensor | None, visual: torch.Tensor, model_inputs: Mapping[str, Any]
    ) -> VisualLayout:
        """Image items (as LLaVA-NeXT's) and video items."""
        if input_ids is None:
            raise ValueError(
                "LLaVA-OneVision needs input_ids (not only inputs_embeds) to tell image from video tokens."
            )
        image = input_ids == int(self.model.config.image_token_id)
        video = input_ids == int(self.model.config.video_token_id)
        return [(image, self._image_grids(image, model_inputs)), (video, self._video_grids(video, model_inputs))]

    def register_runtime_hooks(self, runtime: Any) -> list[Any]:
        """Images as LLaVA-NeXT's; the video pixels' shape recorded on what ``get_video_features`` returns."""
        record = record_layout_inputs(LAYOUT_INPUTS["video"])
        return super().register_runtime_hooks(runtime) + [wrap_method(self.model.model, "get_video_features", record)]

    # --- input-level methods ---------------------------------------------------------------------------------
    def register_projected_pooling(self, pool: Callable[[torch.Tensor], torch.Tensor]) -> list[Any]:
        """Images as LLaVA-NeXT's; each video frame's projected, downsampled grid through ``pool``."""
        side = self.frame_side()

        def post(result: torch.Tensor, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
            frames, _, dim = result.shape
            if pool(torch.zeros(0, side, side, 1)).shape[1:3].numel() == side * side:
                return result  # every token kept: the frames pass unchanged
            return pool(result.reshape(frames, side, side, dim)).reshape(frames, -1, dim)

        return super().register_projected_pooling(pool) + [wrap_method(self.model.model, "apply_pooling", post)]

    def register_feature_pooling(self, pool: Callable[[torch.Tensor], torch.Tensor]) -> list[Any]:
        """Images as LLaVA-NeXT's; each video frame's vision features downsampled by the model's own
        ``apply_pooling``, pooled and then projected (the projection of the unpooled frames is discarded)."""
        inner = self.model.model
        side = self.frame_side()
        state: dict[str, Any] = {"busy": False}

        def keep_input(module: nn.Module, args: tuple) -> None:
            if not state["busy"]:
                state["features"] = args[0]

        def post(result: torch.Tensor, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
            features = state.pop("features")
            if pool(torch.zeros(0, side, side, 1)).shape[1:3].numel() == side * side:
                return result  # every token kept: exactly the model's own (projected, then downsampled) frames
            downsampled = type(inner).apply_pooling(inner, features)  # (frames, s2 * s2, d_vision)
            frames, _, dim = downsampled.shape
            pooled = pool(downsampled.reshape(frames, side, side, dim)).reshape(frames, -1, dim)
            state["busy"] = True
            try:
                return self.projector()(pooled)
            finally:
                state["busy"] = False

        handles = super().register_feature_pooling(pool)
        handles.append(self.projector().register_forward_pre_hook(keep_input))
        handles.append(wrap_method(inner, "apply_pooling", post))
        return handles
