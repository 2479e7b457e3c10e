"""Adapter for Gemma 3 (`Gemma3ForConditionalGeneration`).

What differs from LLaVA, and where it is handled:

* Bidirectional image blocks: with ``token_type_ids`` (1 at image tokens, as the Gemma 3 processor returns them)
  every contiguous run of image tokens attends to itself in both directions. A hook captures ``token_type_ids`` of
  each forward; :meth:`Gemma3Adapter.build_mask` gathers them to the kept tokens and rebuilds the masks of layers
  >= K with the model's own composition: full layers OR(causal, block), sliding layers AND(window, OR(causal,
  block)). Removing tokens never merges two runs (the text between images is always kept), so the kept tokens of an
  image still form one block. Decode steps are text queries: plain causal masks, as the model builds them then.
* Sliding and global layers: different RoPE bases (one (cos, sin) per layer type, gathered per layer by the
  engine); a sliding layer's window counts the tokens of the sequence it runs on, i.e. *kept* tokens for layers
  >= K; its cache keeps the last ``sliding_window - 1`` of them.
* q/k norms: Gemma 3 normalises per head on (B, H, N, head_dim) tensors, after the head split. The scorer captures
  the ``q_proj`` / ``k_proj`` outputs and :meth:`Gemma3Adapter.apply_rope_to_query_key` runs the model's own
  ``q_norm`` / ``k_norm`` modules before RoPE; the scaling is ``query_pre_attn_scalar ** -0.5``.
* DeCo / pooling: Gemma 3's projector average-pools the (image_size / patch_size)^2 patch grid to the
  ``mm_tokens_per_image`` token grid, then normalises and projects. The method pools that token grid, between the
  projector's own average pool and its norm + projection; the pooled grid must divide the token grid, so that the
  result is exactly an average pool of the projector's input patch grid (else a ValueError at apply time).
* VisionZip: SigLIP has no [CLS] token; a token's dominance is the mean attention its kernel x kernel patches
  receive from the patches of their image in the tower's last encoder layer (mean over heads), its key the mean of
  theirs. Zipped on the same token grid as DeCo.
* DivPrune: the base hook on the projector's output (the token grid, LLM width) applies as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import masking_utils
from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

from divico.adapters.base import AttentionLayout, VisionAttentionStats
from divico.adapters.llava import LlavaAdapter
from divico.registry import register_adapter

#: Index of ``token_type_ids`` among the positional arguments of ``Gemma3ForConditionalGeneration.forward``
#: (input_ids, pixel_values, attention_mask, position_ids, cache, token_type_ids, ...).
_TOKEN_TYPE_IDS_POSITION = 5


@register_adapter
class Gemma3Adapter(LlavaAdapter):
    """`Gemma3ForConditionalGeneration`: ``mm_tokens_per_image`` placeholders (``image_token_id``) per image or
    pan-and-scan crop, each between ``boi`` / ``eoi`` text tokens."""

    model_classes = ("Gemma3ForConditionalGeneration",)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        if getattr(self.text_config(), "use_bidirectional_attention", False):
            raise ValueError(
                "This Gemma 3 text model has use_bidirectional_attention=True (every token sees every token); "
                "divico needs the causal model (use_bidirectional_attention=False) to score and prune at layer K."
            )
        self._runtime: Any = None
        self._token_type_ids: torch.Tensor | None = None

    def tokens_per_image(self) -> int:
        return int(self.model.config.mm_tokens_per_image)

    # --- attention internals ---------------------------------------------------------------------------------
    def query_key_modules(self, attention: nn.Module) -> tuple[nn.Module, nn.Module]:
        """``q_proj`` / ``k_proj``: their outputs are (B, N, heads * head_dim), the layout the scorer splits;
        the per-head norms follow in :meth:`apply_rope_to_query_key`."""
        return attention.q_proj, attention.k_proj

    def attention_layout(self, attention: nn.Module) -> AttentionLayout:
        softcap = getattr(attention, "attn_logit_softcapping", None)
        if softcap is not None:
            raise ValueError(
                f"attn_logit_softcapping={softcap}: divico's scores are softmax(q.k * scaling) without soft-capping; "
                "only Gemma 3 configs with attn_logit_softcapping=None (every released Gemma 3) are supported."
            )
        return super().attention_layout(attention)

    def apply_rope_to_query_key(
        self,
        attention: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        query_position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's ``q_norm`` / ``k_norm`` on query (B, H, Q, hd) and key (B, Hkv, N, hd), then RoPE."""
        return super().apply_rope_to_query_key(
            attention, attention.q_norm(query), attention.k_norm(key), position_embeddings, query_position_embeddings
        )

    # --- masks -----------------------------------------------------------------------------------------------
    def register_runtime_hooks(self, runtime: Any) -> list[Any]:
        """Capture each forward's ``token_type_ids`` (None when not given) for :meth:`build_mask`."""
        self._runtime = runtime

        def capture(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            fallback = args[_TOKEN_TYPE_IDS_POSITION] if len(args) > _TOKEN_TYPE_IDS_POSITION else None
            self._token_type_ids = kwargs.get("token_type_ids", fallback)

        return [self.model.register_forward_pre_hook(capture, with_kwargs=True)]

    def kept_token_type_ids(self) -> torch.Tensor | None:
        """(B, M) ``token_type_ids`` of the compressed prefill (0 in padding slots), or None outside a compressing
        prefill or when the forward got none (the model then attends causally everywhere)."""
        selection = None if self._runtime is None else self._runtime.current_selection
        type_ids = self._token_type_ids
        if selection is None or type_ids is None:
            return None
        if type_ids.shape[1] == selection.compressed_length and type_ids.shape[1] != selection.original_length:
            return type_ids  # already shortened by an input-level method
        if type_ids.shape[1] != selection.original_length:
            raise ValueError(
                f"token_type_ids has {type_ids.shape[1]} columns but the prompt has {selection.original_length} "
                "tokens; pass the processor's (batch, seq) token_type_ids."
            )
        return selection.gather(type_ids, seq_dim=1, fill=0)

    def build_mask(
        self,
        mask_type: str,
        hidden_states: torch.Tensor,
        attention_mask_2d: torch.Tensor | None,
        cache: Any,
        layer_idx: int,
    ) -> Any:
        """Layer ``layer_idx``'s mask for the compressed sequence, with the kept image tokens' bidirectional blocks.

        Composed as Gemma 3 composes it (``create_masks_for_vision_model``), but sized against layer ``layer_idx``'s
        cache (the first layer >= K of its type) instead of the first layer of the type. In a prefill that cache is
        empty, so the block ids (B, M) cover every key.
        """
        type_ids = self.kept_token_type_ids()
        if type_ids is None:
            return super().build_mask(mask_type, hidden_states, attention_mask_2d, cache, layer_idx)
        blocks = get_block_sequence_ids_for_mask(type_ids, device=hidden_states.device)
        common = dict(
            config=self.text_config(),
            inputs_embeds=hidden_states,
            attention_mask=attention_mask_2d,
            cache=cache,
            position_ids=None,  # kept positions are not contiguous: they would read as packed sequences
            layer_idx=layer_idx,
        )
        window = self.sliding_window(layer_idx)
        if mask_type == "sliding_attention" and window is not None:
            return masking_utils.create_causal_mask(
                **common,
                or_mask_function=masking_utils.blockwise_overlay(blocks),
                and_mask_function=masking_utils.sliding_window_overlay(window),
            )
        return masking_utils.create_causal_mask(**common, block_sequence_ids=blocks)

    # --- DeCo / pooling --------------------------------------------------------------------------------------
    def register_feature_pooling(self, pool: Callable[[torch.Tensor], torch.Tensor]) -> list[Any]:
        """Pool each image's token grid between the projector's average pool and its norm + projection.

        Raises
        ------
        ValueError
            If the pooled grid (h', w') does not divide the s x s token grid (s = sqrt(mm_tokens_per_image)): the
            pooling windows would straddle Gemma 3's own pooling cells unevenly, and the result would not be an
            average pool of the patch grid.
        """
        grid = self.image_grid()
        projector = self.projector()
        probe = pool(torch.zeros(1, grid.h, grid.w, 1))
        pooled_h, pooled_w = int(probe.shape[1]), int(probe.shape[2])
        if grid.h % pooled_h or grid.w % pooled_w:
            divisors = [d for d in range(1, grid.h + 1) if grid.h % d == 0]
            raise ValueError(
                f"Gemma 3 pools its {projector.patches_per_image}x{projector.patches_per_image} patch grid to a "
                f"{grid.h}x{grid.w} token grid; the method pools that grid to {pooled_h}x{pooled_w}, which does not "
                f"divide it, so the result would not be an average pool of the patch grid. Valid pooled sides: "
                f"{divisors} (square grids: keep_tokens in {[d * d for d in divisors]})."
            )

        def post_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            # output: (n, d, s, s) -> pool on (n, s, s, d) -> (n, d, h', w'); the projector flattens it row-major.
            return pool(output.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

        return [projector.avg_pool.register_forward_hook(post_hook)]

    # --- VisionZip -------------------------------------------------------------------------------------------
    def register_attention_pooling(
        self, pool: Callable[[torch.Tensor, VisionAttentionStats], torch.Tensor]
    ) -> list[Any]:
        """VisionZip on the token grid, with the attention of SigLIP's last encoder layer (what the projector reads,
        after the tower's post-layernorm), computed from its captured q/k so the tower keeps its kernel."""
        attention = self.model.model.vision_tower.encoder.layers[-1].self_attn
        projector = self.projector()
        captured: dict[str, torch.Tensor] = {}

        def keep(name: str) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
            def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
                captured[name] = output.detach()
            return hook

        def post_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            if not {"query", "key"} <= set(captured):
                raise RuntimeError("VisionZip: the vision tower's last layer did not run before the projector.")
            stats = self._token_attention(attention, captured.pop("query"), captured.pop("key"))
            # output: (n, d, s, s) -> zip on (n, s, s, d) -> (n, 1, k, d) -> (n, d, 1, k), flattened by the projector.
            return pool(output.permute(0, 2, 3, 1), stats).permute(0, 3, 1, 2)

        return [attention.q_proj.register_forward_hook(keep("query")),
                attention.k_proj.register_forward_hook(keep("key")),
                projector.avg_pool.register_forward_hook(post_hook)]

    def _token_attention(self, attention: nn.Module, query: torch.Tensor, key: torch.Tensor) -> VisionAttentionStats:
        """Per LLM token: attention received and key of its patches, from q/k (n, P, d) of P = (s * kernel)^2."""
        projector = self.projector()
        side, kernel = int(projector.tokens_per_side), int(projector.kernel_size)
        heads = int(attention.num_heads)
        count, patches, _ = key.shape
        query = query.float().view(count, patches, heads, -1).transpose(1, 2)  # (n, H, P, hd)
        key = key.float().view(count, patches, heads, -1).transpose(1, 2)
        received = torch.zeros(count, patches, dtype=torch.float32, device=key.device)
        for head in range(heads):  # one (n, P, P) matrix at a time: 4096 patches per image in the real model
            logits = query[:, head] @ key[:, head].transpose(-1, -2) * float(attention.scale)
            received += torch.softmax(logits, dim=-1).mean(dim=1)
        received /= heads

        def per_token(values: torch.Tensor) -> torch.Tensor:
            # (n, P, ...) in patch-row-major order -> (n, s * s, ...) means over each token's kernel x kernel patches.
            cells = values.reshape(count, side, kernel, side, kernel, *values.shape[2:]).mean(dim=(2, 4))
            return cells.reshape(count, side * side, *values.shape[2:])

        return VisionAttentionStats(dominance=per_token(received), keys=per_token(key.mean(dim=1)), cls=None,
                                    has_cls=False)
