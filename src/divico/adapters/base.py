"""`ModelAdapter`: everything divico needs to know about one model family, and nothing else.

The engine (:mod:`divico.runtime`) is model-agnostic; an adapter tells it where the visual tokens are, which
modules are the decoder layers, how attention heads and RoPE are laid out and how masks are rebuilt. Adding a
family is one adapter file plus one `@register_adapter` line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, TypeVar

import torch
from torch import nn
from transformers import masking_utils

_ADAPTERS: dict[str, type["ModelAdapter"]] = {}
A = TypeVar("A", bound=type)


def register_adapter(cls: A) -> A:
    """Class decorator: register an adapter for the class names in ``cls.model_classes``."""
    for name in cls.model_classes:  # type: ignore[attr-defined]
        _ADAPTERS[name] = cls  # type: ignore[assignment]
    return cls


def _ensure_loaded() -> None:
    import divico.adapters  # noqa: F401


def available_models() -> list[str]:
    """Class names of the supported transformers models, sorted."""
    _ensure_loaded()
    return sorted(_ADAPTERS)


def get_adapter(model: nn.Module) -> "ModelAdapter":
    """Adapter instance for ``model``; a clear error names the supported classes otherwise."""
    _ensure_loaded()
    name = type(model).__name__
    if name not in _ADAPTERS:
        raise TypeError(
            f"Unsupported model class {name}; divico supports: {', '.join(sorted(_ADAPTERS))}. "
            "Pass the top-level *ForConditionalGeneration model (a peft PeftModel wrapping one also works)."
        )
    return _ADAPTERS[name](model)


@dataclass(frozen=True)
class AttentionLayout:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float


class ModelAdapter:
    """Base adapter for decoder-only LVLMs whose text model follows the Llama layout of transformers 5.

    Subclasses set ``model_classes`` and implement :meth:`text_model`, :meth:`visual_token_mask` and, for
    input-level methods, :meth:`projector`.
    """

    model_classes: ClassVar[tuple[str, ...]] = ()

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

    def visual_groups(self, input_ids: torch.Tensor | None, visual: torch.Tensor) -> torch.Tensor:
        """(B, N) long group id of each visual token (-1 elsewhere): frames/images for per-frame keeping.

        The default treats each contiguous run of visual tokens as one group.
        """
        starts = visual & ~torch.nn.functional.pad(visual, (1, 0))[:, :-1]
        groups = starts.long().cumsum(dim=1) - 1
        return groups.masked_fill(~visual, -1)

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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE for query (B, H, Q, hd) at the last Q positions and key (B, Hkv, N, hd) at all positions."""
        rope = self.rope_function()
        cos, sin = position_embeddings
        q_len = query.shape[2]
        query, _ = rope(query, query, cos[..., -q_len:, :], sin[..., -q_len:, :])
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

    def pad_token_id(self) -> int:
        for config in (self.model.config, self.text_config()):
            value = getattr(config, "pad_token_id", None)
            if value is not None:
                return int(value)
        return 0
