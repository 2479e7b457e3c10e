"""Adapter for LLaVA-1.5 / LLaVA-NeXT-style models (`LlavaForConditionalGeneration`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from divico.adapters.base import VISION_ATTENTION, ModelAdapter, VisionAttentionStats
from divico.grids import VisualGrid, pool_grid_rows
from divico.registry import register_adapter


class ClsTowerCapture:
    """Captures one encoder layer of a ViT with a leading [CLS] token (CLIP, DINOv2): its q/k projections and output.

    Forward hooks only, so the tower keeps its attention kernel (SDPA); :meth:`stats` computes the [CLS] row of the
    layer's attention from the captured q/k (``softmax(q_cls . k * scale)`` over every token, [CLS] included, as
    eager attention would) and returns it for the patch tokens, mean over heads.

    Parameters
    ----------
    tower
        The vision model (``CLIPVisionModel``, ``Dinov2Model``, ...).
    feature_layer
        The ``hidden_states`` index the projector reads (``config.vision_feature_layer``, e.g. -2): the output of
        encoder layer ``feature_layer - 1`` (``feature_layer >= 1``) or ``num_layers + feature_layer`` (< 0).
    """

    def __init__(self, tower: nn.Module, feature_layer: Any) -> None:
        if isinstance(feature_layer, bool) or not isinstance(feature_layer, int):
            raise TypeError(f"VisionZip reads one vision layer; vision_feature_layer={feature_layer!r} is not an int.")
        layers = _encoder_layers(tower)
        index = feature_layer - 1 if feature_layer > 0 else len(layers) + feature_layer
        if not 0 <= index < len(layers):
            raise ValueError(
                f"vision_feature_layer={feature_layer} reads no encoder layer's output (0 is the embeddings); valid: "
                f"[1, {len(layers)}] or [-{len(layers)}, -1]."
            )
        self.layer = layers[index]
        self.attention = getattr(self.layer, "self_attn", None) or self.layer.attention
        self.captured: dict[str, torch.Tensor] = {}

    def register(self) -> list[Any]:
        def keep(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple, output: Any) -> None:
                self.captured[name] = (output[0] if isinstance(output, tuple) else output).detach()
            return hook

        return [self.attention.q_proj.register_forward_hook(keep("query")),
                self.attention.k_proj.register_forward_hook(keep("key")),
                self.layer.register_forward_hook(keep("output"))]

    def stats(self, cls_is_prefix: bool) -> VisionAttentionStats:
        """Statistics of the last captured forward for its n images.

        Parameters
        ----------
        cls_is_prefix
            The projector's input keeps the [CLS] token as the item's prefix (``"full"`` feature strategy, video
            frames); then ``cls`` is None.
        """
        if not {"query", "key", "output"} <= set(self.captured):
            raise RuntimeError("VisionZip: the vision layer the projector reads did not run before the projector.")
        heads = int(getattr(self.attention, "num_heads", None) or self.attention.num_attention_heads)
        scale = float(getattr(self.attention, "scale", None) or self.attention.scaling)
        query, key, output = self.captured["query"], self.captured["key"], self.captured["output"]
        count, length, _ = key.shape
        key = key.float().view(count, length, heads, -1).transpose(1, 2)  # (n, H, 1 + P, hd)
        cls_query = query[:, :1].float().view(count, 1, heads, -1).transpose(1, 2)  # (n, H, 1, hd)
        attention = torch.softmax(cls_query @ key.transpose(-1, -2) * scale, dim=-1)[:, :, 0]  # (n, H, 1 + P)
        return VisionAttentionStats(
            dominance=attention[:, :, 1:].mean(dim=1),
            keys=key[:, :, 1:].mean(dim=1),
            cls=None if cls_is_prefix else output[:, 0],
            has_cls=True,
        )


def _encoder_layers(tower: nn.Module) -> nn.ModuleList:
    """The encoder layers of a CLIP-style (``vision_model.encoder.layers``) or DINOv2-style (``encoder.layer``) ViT."""
    for path in ("vision_model.encoder.layers", "encoder.layers", "encoder.layer"):
        module: Any = tower
        for name in path.split("."):
            module = getattr(module, name, None)
        if isinstance(module, nn.ModuleList):
            return module
    raise TypeError(f"{type(tower).__name__}: no encoder layers found (vision_model.encoder.layers / encoder.layer).")


def register_cls_attention_pooling(
    capture: list[ClsTowerCapture],
    projector: nn.Module,
    grids: dict[int, VisualGrid],
    pool: Callable[[torch.Tensor, VisionAttentionStats], torch.Tensor],
) -> list[Any]:
    """Hooks for VisionZip on towers with [CLS]: the captures, and a projector pre-hook that pools each row.

    Parameters
    ----------
    capture
        One capture per vision tower feeding ``projector``; the projector pools with the one that ran last.
    grids
        Item layout by the projector input's token count (an image; a video frame).
    """
    latest: dict[str, ClsTowerCapture] = {}
    handles: list[Any] = []
    for one in capture:
        handles.extend(one.register())

        def ran(module: nn.Module, args: tuple, output: Any, one: ClsTowerCapture = one) -> None:
            latest["capture"] = one  # the tower that ran last feeds the projector next

        handles.append(one.layer.register_forward_hook(ran))

    def pre_hook(module: nn.Module, args: tuple) -> tuple:
        features = args[0]
        if features.dim() != 3 or features.shape[1] not in grids:
            raise ValueError(
                f"projector input {tuple(features.shape)} matches no item layout ({sorted(grids)} tokens)."
            )
        grid = grids[features.shape[1]]
        if "capture" not in latest:
            raise RuntimeError("VisionZip: no vision tower ran before the projector.")
        stats = latest.pop("capture").stats(cls_is_prefix=grid.prefix == 1)
        return (pool_grid_rows(features, grid, lambda cells: pool(cells, stats)),) + tuple(args[1:])

    handles.append(projector.register_forward_pre_hook(pre_hook))
    return handles


@register_adapter
class LlavaAdapter(ModelAdapter):
    """`LlavaForConditionalGeneration`: image tokens are ``config.image_token_id`` placeholders in ``input_ids``."""

    model_classes = ("LlavaForConditionalGeneration",)
    capabilities = frozenset({VISION_ATTENTION})

    def text_model(self) -> nn.Module:
        return self.model.model.language_model

    def projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    def visual_token_ids(self) -> tuple[int, ...]:
        return (int(self.model.config.image_token_id),)

    def tokens_per_image(self) -> int:
        vision = self.model.config.vision_config
        side = int(vision.image_size) // int(vision.patch_size)
        extra = 1 if self.model.config.vision_feature_select_strategy == "full" else 0
        return side * side + extra

    def register_attention_pooling(
        self, pool: Callable[[torch.Tensor, VisionAttentionStats], torch.Tensor]
    ) -> list[Any]:
        """The [CLS] attention of the vision layer ``vision_feature_layer`` reads, captured from its q/k."""
        if not hasattr(self.model.model, "vision_tower"):
            raise TypeError(f"{type(self).__name__} has no LLaVA-style vision_tower; it does not support VisionZip.")
        capture = ClsTowerCapture(self.model.model.vision_tower, self.model.config.vision_feature_layer)
        grid = self.image_grid()
        return register_cls_attention_pooling([capture], self.projector(), {grid.size: grid}, pool)
