"""The layer-K runtime: hooks that compress visual tokens inside an unmodified transformers model.

Lifecycle (kvpress-style): :meth:`CompressionRuntime.attach` registers every hook, :meth:`detach` removes them
all. No transformers code is copied or patched; the hooks only swap keyword arguments that the text model
already passes to each decoder layer (hidden states, RoPE (cos, sin), position ids, attention mask).

Per forward the runtime is in one of three phases, decided by a pre-hook on the top-level model:

* ``prefill``: the prompt contains visual tokens and the cache is empty. Layer-level methods capture layer K-1's
  q/k, score, select and compress in layer K's pre-hook; layers >= K get the compressed sequence; the final norm's
  output is scattered back to the prompt length so logits (and a training loss) line up with ``input_ids``.
  Input-level methods (DeCo) rewrite the inputs and pool features before the projector.
* ``decode``: a later step on a cache this runtime filled; layers >= K (or all layers, for DeCo) get a mask sized
  to their shorter cache. The selection of the prefill is reused.
* ``passthrough``: anything else (no image): nothing changes.

A method may compress at a schedule of layers instead of one K (:meth:`CompressionMethod.compression_layers`,
PyramidDrop): the layers between two boundaries form a stage; at each later boundary the layer before it scores the
stage's sequence, ``select`` picks among the tokens still present, and the kept set is composed with the earlier
one, so RoPE, position ids, the masks (one set per stage, in prefill and decode) and the final scatter-back all work
in original positions. Methods with ``needs_states`` (DART) get layer K's input and layer K-1's post-RoPE keys (at
every boundary of a schedule, with layer 0's input; with ``needs_attention_rows`` also the attention of chosen query
rows: SparseVLM's raters).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from divico.adapters.base import ModelAdapter, item_offsets
from divico.config import CompressionConfig
from divico.methods.base import CompressionMethod, InputCompressionMethod, SelectionInputs
from divico.report import CompressionReport
from divico.scoring import LastTokenAttentionScorer
from divico.selection import TokenSelection, positions_of

_CACHE_KEYS = ("cache", "past_key_values")  # transformers >= 5.24 renamed past_key_values to cache
_STATE_ATTR = "_divico_state"


def _cache_from(kwargs: dict[str, Any]) -> Any:
    for key in _CACHE_KEYS:
        if kwargs.get(key) is not None:
            return kwargs[key]
    return None


def _cache_length(cache: Any, layer_idx: int = 0) -> int:
    return 0 if cache is None else int(cache.get_seq_length(layer_idx))


@dataclass
class _DecodeState:
    """What later decode steps need from a compressed prefill; stored on the cache object it belongs to."""

    owner: "CompressionRuntime"
    prefill_cache_length: int  # layer 0's cache length after the prefill (full for layer-level, short for DeCo)
    compressed_mask_2d: torch.Tensor  # (B, M)
    position_shift: torch.Tensor  # (B,) subtracted from generate()'s full-prompt position ids (input-level methods)
    # (B, M_s) mask of each stage of a multi-stage schedule (PyramidDrop); empty for one stage (compressed_mask_2d).
    stage_masks_2d: tuple[torch.Tensor, ...] = ()


@dataclass
class _Step:
    """Transient state of one forward."""

    phase: str
    attention_mask_2d: torch.Tensor | None = None  # (B, N) as given to the model
    visual: torch.Tensor | None = None  # (B, N)
    groups: torch.Tensor | None = None  # (B, N) frame/image ids for per_frame_keep
    position_shift: torch.Tensor | None = None  # (B,)
    selection: TokenSelection | None = None
    compressed_mask_2d: torch.Tensor | None = None  # (B, M)
    layer_kwargs: dict[str, Any] = field(default_factory=dict)
    # id(cos) -> (the layer's full-length (cos, sin), gathered (cos, sin)): one entry per RoPE table of layers >= K
    # (models with one RoPE per layer type pass each layer its own).
    gathered_rope: dict[int, tuple[Any, Any]] = field(default_factory=dict)
    masks: dict[str, Any] = field(default_factory=dict)
    decode: _DecodeState | None = None
    # Stages after the first of a multi-stage schedule: stage -> its masks (stage 0 uses ``masks``).
    stage_masks: dict[int, dict[str, Any]] = field(default_factory=dict)
    stage: int = 0  # stages compressed so far in this prefill, minus one
    stage_masks_2d: list[torch.Tensor] = field(default_factory=list)
    stage_reports: list[dict[str, object]] = field(default_factory=list)
    first_scores: torch.Tensor | None = None  # (B, N) scores of the first boundary, for the report
    stage_input_positions: torch.Tensor | None = None  # (B, M) original position of each slot at a later boundary
    input_embeddings: torch.Tensor | None = None  # (B, N, d) decoder layer 0's input, for needs_states methods


class CompressionRuntime:
    """Owns the hooks, the trainable compressor and the last report of one compressed model.

    Parameters
    ----------
    model
        Top-level transformers model (e.g. ``LlavaForConditionalGeneration``).
    config
        What to compress.
    adapter
        The model family's adapter.
    method
        Instance of the registered method named by ``config.method``.
    """

    def __init__(
        self, model: nn.Module, config: CompressionConfig, adapter: ModelAdapter, method: CompressionMethod
    ) -> None:
        self.model = model
        self.config = config
        self.adapter = adapter
        self.method = method
        #: Decoder layers whose input is compressed, ascending: [K] for single-stage methods, a schedule of stage
        #: boundaries for PyramidDrop. Layers between two boundaries form a stage and share one sequence length.
        self.layers = method.compression_layers(adapter.num_layers()) if method.level == "layer" else [0]
        self.layer = self.layers[0]
        self.report: CompressionReport | None = None
        self.compressor = method.build_compressor(adapter)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._step: _Step | None = None
        self.scorer: LastTokenAttentionScorer | None = None
        # Methods with needs_states (DART) read layer K-1's keys through the same capture, without scoring.
        if method.level == "layer" and (method.needs_scores or method.needs_states):
            self.scorer = LastTokenAttentionScorer(
                adapter,
                adapter.attention(self.layer - 1),
                mode=config.scoring,
                sliding_window=adapter.sliding_window(self.layer - 1),
            )
        # Later boundaries of a schedule score at their own layer before (on the sequence of the stage before).
        self.stage_scorers: list[LastTokenAttentionScorer] = []
        if method.level == "layer" and (method.needs_scores or method.needs_states):
            self.stage_scorers = [
                LastTokenAttentionScorer(adapter, adapter.attention(layer - 1), mode=config.scoring,
                                         sliding_window=adapter.sliding_window(layer - 1))
                for layer in self.layers[1:]
            ]
        for scorer in ([self.scorer] if self.scorer is not None else []) + self.stage_scorers:
            scorer.capture_all_queries = bool(method.needs_states and method.needs_attention_rows)

    # --- lifecycle -------------------------------------------------------------------------------------------
    def attach(self) -> None:
        if self.compressor is not None:
            reference = next(self.adapter.text_model().parameters())
            self.compressor.to(device=reference.device, dtype=reference.dtype)
            self.compressor.train(self.model.training)
            self.model.add_module("divico_compressor", self.compressor)
        try:
            self._handles.append(
                self.model.register_forward_pre_hook(self._top_pre_hook, with_kwargs=True, prepend=True)
            )
            self._handles.append(
                self.model.register_forward_hook(self._top_post_hook, with_kwargs=True, always_call=True)
            )
            self._handles.extend(self.adapter.register_runtime_hooks(self))
            if self.method.level == "layer":
                for scorer in ([self.scorer] if self.scorer is not None else []) + self.stage_scorers:
                    scorer.register()
                for idx in range(self.layer, self.adapter.num_layers()):
                    layer = self.adapter.decoder_layers()[idx]
                    hook = functools.partial(self._layer_pre_hook, idx)
                    self._handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
                if self.method.needs_states:
                    self._handles.append(self.adapter.decoder_layers()[0].register_forward_pre_hook(
                        self._capture_input_embeddings, with_kwargs=True))
                self._handles.append(self.adapter.final_norm().register_forward_hook(self._final_norm_hook))
            else:
                # Input-level methods need no per-layer hook: the model itself sees a shorter prompt.
                assert isinstance(self.method, InputCompressionMethod)
                self._handles.extend(self.method.register_input_hooks(self.adapter))
        except Exception:
            self.detach()
            raise

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for scorer in ([self.scorer] if self.scorer is not None else []) + self.stage_scorers:
            scorer.remove()
        if "divico_compressor" in self.model._modules:
            del self.model._modules["divico_compressor"]
        self._step = None

    @property
    def current_selection(self) -> TokenSelection | None:
        """Kept tokens of the prefill in progress (from layer K on; for input-level methods from the start), for
        adapter hooks (:meth:`ModelAdapter.register_runtime_hooks`); None outside a compressing prefill."""
        step = self._step
        return None if step is None or step.phase != "prefill" else step.selection

    @property
    def stage_input_positions(self) -> torch.Tensor | None:
        """At a later boundary of a schedule (while its ``select`` runs): (B, M) original prompt position of each
        slot of the sequence being selected from (-1 at padding slots); None otherwise."""
        step = self._step
        return None if step is None or step.phase != "prefill" else step.stage_input_positions

    def _capture_input_embeddings(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Keep decoder layer 0's input of a compressing prefill (``SelectionInputs.input_embeddings``)."""
        step = self._step
        if step is not None and step.phase == "prefill":
            step.input_embeddings = args[0] if args else kwargs["hidden_states"]

    # --- top level -------------------------------------------------------------------------------------------
    def _top_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        inputs_embeds = kwargs.get("inputs_embeds")
        attention_mask = kwargs.get("attention_mask")
        cache = _cache_from(kwargs)
        past = _cache_length(cache)
        visual = self.adapter.visual_token_mask(input_ids, inputs_embeds)
        decode_state = getattr(cache, _STATE_ATTR, None) if cache is not None else None
        if attention_mask is not None and attention_mask.dim() != 2:
            self._step = _Step(phase="passthrough")
            if bool(visual.any()):
                raise ValueError(
                    f"divico needs a 2-D (batch, seq) attention_mask for a prompt with visual tokens, got a "
                    f"{attention_mask.dim()}-D mask of shape {tuple(attention_mask.shape)}; pass the processor's "
                    f"(batch, seq) 0/1 mask (expected shape {tuple(visual.shape)})."
                )
            return None
        # A cache this runtime filled: a decode step (a generated id may equal the image token id).
        if isinstance(decode_state, _DecodeState) and decode_state.owner is self and past > 0:
            self._step = _Step(phase="decode", attention_mask_2d=attention_mask, decode=decode_state)
            if isinstance(self.method, InputCompressionMethod):
                return self._rewrite_inputs_for_decode(args, kwargs, decode_state, past)
            return None
        if bool(visual.any()):
            if past > 0:
                raise ValueError(
                    f"The prompt has visual tokens but the cache already holds {past} tokens (valid: 0, an empty "
                    "cache); divico compresses images in the prefill only. Start from an empty cache (or "
                    "remove_compression first)."
                )
            if attention_mask is not None and not bool(attention_mask[:, -1].bool().all()):
                raise ValueError(
                    "divico needs left padding (the last position of every sample must be a real token); "
                    "set tokenizer/processor padding_side='left'."
                )
            query_positions = _scoring_positions(kwargs.get("labels"), visual.shape[1])
            at_query = visual[:, -1] if query_positions is None else visual.gather(1, query_positions[:, None])[:, 0]
            if bool(at_query.any()):
                sample = int(at_query.nonzero()[0, 0])
                position = visual.shape[1] - 1 if query_positions is None else int(query_positions[sample])
                raise ValueError(
                    f"The last prompt token of sample {sample} (position {position} of {visual.shape[1]}) is a visual "
                    "token; the prompt must end with text: at least one text token after the last visual token "
                    "(its attention scores the visual tokens)."
                )
            self._step = _Step(phase="prefill", attention_mask_2d=attention_mask, visual=visual)
            if isinstance(self.method, InputCompressionMethod):
                return self._rewrite_inputs_for_prefill(args, kwargs, input_ids, visual)
            if self.config.per_frame_keep:
                self._step.groups = self.adapter.visual_groups(input_ids, visual, kwargs)
            if self.scorer is not None:
                self.scorer.enable(query_positions)
            for scorer in self.stage_scorers:
                scorer.enable(query_positions)  # positions are mapped to each stage's sequence at its boundary
            return None
        self._step = _Step(phase="passthrough")
        return None

    def _top_post_hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        step, self._step = self._step, None
        for scorer in ([self.scorer] if self.scorer is not None else []) + self.stage_scorers:
            scorer.enabled = False
            scorer.clear()
        if step is None or step.phase != "prefill" or step.selection is None:
            return
        cache = _cache_from(kwargs)
        if cache is None and output is not None:
            cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
        if cache is not None:
            shift = step.position_shift if step.position_shift is not None else step.selection.removed_visual.sum(1)
            state = _DecodeState(self, _cache_length(cache), step.compressed_mask_2d, shift,
                                 tuple(step.stage_masks_2d))
            setattr(cache, _STATE_ATTR, state)

    # --- input-level methods (DeCo) --------------------------------------------------------------------------
    def _rewrite_inputs_for_prefill(
        self, args: tuple, kwargs: dict[str, Any], input_ids: torch.Tensor | None, visual: torch.Tensor
    ) -> tuple[tuple, dict] | None:
        assert isinstance(self.method, InputCompressionMethod) and self._step is not None
        original_inputs = kwargs
        # Each item's pooled tokens fill the first slots of its placeholder run; the rest of the run is dropped.
        keep = ~visual
        layout = self.adapter.visual_grids(input_ids, visual, kwargs)
        pooled_layout = [(mask, [self.method.pooled_grid(grid) for grid in grids]) for mask, grids in layout]
        for (mask, grids), (_, pooled) in zip(layout, pooled_layout):
            item, offset = item_offsets(mask, [grid.size for grid in grids])
            if grids:
                pooled_size = torch.tensor([grid.size for grid in pooled], device=visual.device)
                keep[mask] = offset < pooled_size[item]
        selection = TokenSelection.from_keep_mask(keep, visual)
        step = self._step
        step.selection = selection
        mask_2d = kwargs.get("attention_mask")
        ones = torch.ones(visual.shape, dtype=torch.long, device=visual.device)
        step.compressed_mask_2d = selection.gather(mask_2d if mask_2d is not None else ones, seq_dim=1, fill=0)
        self._record_report(visual, None, selection, extra={
            "grids": [grids for _, grids in layout], "pooled_grids": [pooled for _, pooled in pooled_layout],
        })
        if selection.is_identity:
            return None
        kwargs = dict(kwargs)
        args = tuple(args)
        new_ids = None
        if input_ids is not None:
            new_ids = selection.gather(input_ids, seq_dim=1, fill=self.adapter.pad_token_id())
            if "input_ids" in kwargs or not args:
                kwargs["input_ids"] = new_ids
            else:
                args = (new_ids,) + args[1:]
        if kwargs.get("inputs_embeds") is not None:
            kwargs["inputs_embeds"] = selection.gather(kwargs["inputs_embeds"], seq_dim=1, fill=0.0)
        if mask_2d is not None or not bool(selection.valid.all()):
            kwargs["attention_mask"] = step.compressed_mask_2d
        for key, fill in (("labels", -100), ("mm_token_type_ids", 0), ("token_type_ids", 0)):
            if kwargs.get(key) is not None:
                kwargs[key] = selection.gather(kwargs[key], seq_dim=1, fill=fill)
        compressed_layout = [(selection.gather(mask, seq_dim=1, fill=False), pooled) for mask, pooled in pooled_layout]
        step.position_shift = self.adapter.input_level_positions(
            original_inputs, input_ids, kwargs, new_ids, selection, compressed_layout
        )
        return args, kwargs

    def _rewrite_inputs_for_decode(
        self, args: tuple, kwargs: dict[str, Any], state: _DecodeState, past: int
    ) -> tuple[tuple, dict]:
        kwargs = dict(kwargs)
        mask_2d = kwargs.get("attention_mask")
        kwargs["attention_mask"] = self._decode_mask_2d(state, mask_2d, past, _query_length(args, kwargs))
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] - state.position_shift.view(-1, 1)
        return args, kwargs

    # --- layer-level methods ---------------------------------------------------------------------------------
    def _layer_pre_hook(
        self, layer_idx: int, module: nn.Module, args: tuple, kwargs: dict[str, Any]
    ) -> tuple[tuple, dict] | None:
        step = self._step
        if step is None or step.phase == "passthrough":
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        cache = _cache_from(kwargs)
        stage = self._stage_of(layer_idx)
        if step.phase == "prefill" and layer_idx == self.layer:
            hidden = self._compress(hidden, kwargs, cache)
        elif step.phase == "prefill" and stage > 0 and layer_idx == self.layers[stage]:
            hidden = self._compress_stage(stage, hidden, kwargs, cache)
        if step.phase == "decode" and not step.masks:
            assert step.decode is not None
            # A schedule's first stage has its own mask; compressed_mask_2d is the last stage's.
            first_stage = step.decode.stage_masks_2d[0] if step.decode.stage_masks_2d else None
            mask_2d = self._decode_mask_2d(step.decode, step.attention_mask_2d, _cache_length(cache), hidden.shape[1],
                                           first_stage)
            self._build_masks(step, hidden, mask_2d, cache)
        if step.phase == "decode" and stage > 0 and stage not in step.stage_masks:
            assert step.decode is not None
            mask_2d = self._decode_mask_2d(step.decode, step.attention_mask_2d, _cache_length(cache), hidden.shape[1],
                                           step.decode.stage_masks_2d[stage])
            self._build_masks(step, hidden, mask_2d, cache, stage)
        incoming_rope = kwargs.get("position_embeddings")
        kwargs = dict(kwargs)
        kwargs.update(step.layer_kwargs)
        if step.phase == "prefill" and step.selection is not None and incoming_rope is not None:
            kwargs["position_embeddings"] = self._gathered_rope(step, incoming_rope)
        masks = step.masks if stage == 0 else step.stage_masks[stage]
        kwargs["attention_mask"] = masks[self.adapter.layer_mask_type(layer_idx)]
        if args:
            return (hidden,) + tuple(args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return (), kwargs

    def _gathered_rope(self, step: _Step, incoming: Any) -> Any:
        """This layer's own (cos, sin) at the kept positions; already short ones (set at layer K) pass through."""
        assert step.selection is not None
        if incoming[0].shape[-2] != step.selection.original_length:
            return incoming
        key = id(incoming[0]) if step.stage == 0 else (id(incoming[0]), step.stage)
        if key not in step.gathered_rope:
            step.gathered_rope[key] = (incoming, self.adapter.gather_position_embeddings(incoming, step.selection.gather))
        return step.gathered_rope[key][1]

    def _compress(self, hidden: torch.Tensor, kwargs: dict[str, Any], cache: Any) -> torch.Tensor:
        step = self._step
        assert step is not None and step.visual is not None
        visual = step.visual
        batch, length = visual.shape
        given_mask = step.attention_mask_2d
        mask_2d = given_mask if given_mask is not None else torch.ones_like(visual, dtype=torch.long)
        scores: torch.Tensor | None = None
        states: SelectionInputs | None = None
        if self.scorer is not None:
            if self.method.needs_states:
                states = self._selection_inputs(hidden, kwargs, mask_2d)
            if self.method.needs_scores:
                scores = self.scorer.scores(kwargs.get("position_embeddings"), mask_2d)
            self.scorer.enabled = False
            self.scorer.clear()
        groups = step.groups if step.groups is not None else torch.where(visual, 0, -1)
        # A method that does not score gets zeros to select from; its report says NaN (it did not score).
        selection_scores = scores if scores is not None else torch.zeros(batch, length, device=hidden.device)
        if len(self.layers) > 1:
            stage_states = {} if states is None else {"states": states}
            keep = self.method.select(selection_scores, visual, groups, stage=0, original_visual=visual,
                                      **stage_states)
        elif states is None:
            keep = self.method.select(selection_scores, visual, groups)
        else:
            keep = self.method.select(selection_scores, visual, groups, states=states)
        selection = TokenSelection.from_keep_mask(keep, visual)
        compressed = self.method.compress(hidden, selection, self.compressor)
        step.selection = selection
        step.compressed_mask_2d = selection.gather(mask_2d, seq_dim=1, fill=0)
        layer_kwargs: dict[str, Any] = {}
        if kwargs.get("position_embeddings") is not None:
            layer_kwargs["position_embeddings"] = self.adapter.gather_position_embeddings(
                kwargs["position_embeddings"], selection.gather
            )
        if kwargs.get("position_ids") is not None:
            layer_kwargs["position_ids"] = self.adapter.gather_position_ids(kwargs["position_ids"], selection.gather)
        step.layer_kwargs = layer_kwargs
        # Keep "no mask" when the caller gave none and nothing was padded: the kernel's is_causal path stays exact.
        mask_for_layers = None if given_mask is None and bool(selection.valid.all()) else step.compressed_mask_2d
        self._build_masks(step, compressed, mask_for_layers, cache)
        kl = getattr(self.compressor, "last_kl", None) if self.compressor is not None else None
        self._record_report(visual, scores, selection, kl=kl)
        if len(self.layers) > 1:
            step.stage_masks_2d.append(step.compressed_mask_2d)
            step.first_scores = scores
            step.stage_reports.append(self._stage_record(0, selection))
            self._map_stage_query_positions(step, 1)
        return compressed

    def _stage_record(self, stage: int, selection: TokenSelection) -> dict[str, object]:
        return {"layer": self.layers[stage], "kept_positions": selection.kept_visual_positions(),
                "num_kept": selection.kept_visual.sum(dim=1), "seq_len_after": selection.compressed_length}

    def _map_stage_query_positions(self, step: _Step, stage: int) -> None:
        """Point the next boundary's scorer at the scoring token's slot in the current (compressed) sequence."""
        scorers = self.stage_scorers
        if stage - 1 >= len(scorers) or self.scorer is None or self.scorer.query_positions is None:
            return
        assert step.selection is not None
        original = self.scorer.query_positions
        slot_of = self._slots_of_original(step.selection)
        scorers[stage - 1].query_positions = slot_of.gather(1, original.view(-1, 1))[:, 0].clamp(min=0)

    @staticmethod
    def _slots_of_original(selection: TokenSelection) -> torch.Tensor:
        """(B, N) slot of each original position in the compressed sequence (-1 where removed)."""
        batch = selection.index.shape[0]
        slots = torch.full((batch, selection.original_length), -1, dtype=torch.long, device=selection.index.device)
        rows = torch.arange(batch, device=slots.device).unsqueeze(1).expand_as(selection.index)
        columns = torch.arange(selection.compressed_length, device=slots.device).unsqueeze(0).expand_as(selection.index)
        slots[rows[selection.valid], selection.index[selection.valid]] = columns[selection.valid]
        return slots

    def _compress_stage(self, stage: int, hidden: torch.Tensor, kwargs: dict[str, Any], cache: Any) -> torch.Tensor:
        """A later boundary of a schedule: select among the tokens the stage before kept, shorten again.

        ``hidden`` is the (B, M, d) sequence of the stage before; the method's ``select`` sees that sequence (its
        visual mask, groups and the scores of the layer before this boundary); the new kept set is composed with
        the old one, so every later piece (RoPE, position ids, masks, scatter-back) uses original positions.
        """
        step = self._step
        assert step is not None and step.selection is not None and step.visual is not None
        previous = step.selection
        step.stage = stage
        current_mask = previous.gather(step.attention_mask_2d if step.attention_mask_2d is not None
                                       else torch.ones_like(step.visual, dtype=torch.long), seq_dim=1, fill=0)
        scores: torch.Tensor | None = None
        stage_states: dict[str, SelectionInputs] = {}
        if self.stage_scorers:
            scorer = self.stage_scorers[stage - 1]
            if self.method.needs_states:
                slots = torch.where(previous.valid, previous.index, -1)
                stage_states["states"] = self._selection_inputs(hidden, kwargs, current_mask, scorer, slots)
            if self.method.needs_scores:
                scores = scorer.scores(kwargs.get("position_embeddings"), current_mask)
            scorer.enabled = False
            scorer.clear()
        visual_now = previous.kept_visual
        original_groups = step.groups if step.groups is not None else torch.where(step.visual, 0, -1)
        groups_now = torch.where(visual_now, previous.gather(original_groups, seq_dim=1, fill=-1), -1)
        selection_scores = scores if scores is not None else torch.zeros(visual_now.shape, device=hidden.device)
        step.stage_input_positions = torch.where(previous.valid, previous.index, -1)
        keep_now = self.method.select(selection_scores, visual_now, groups_now, stage=stage,
                                      original_visual=step.visual, **stage_states)
        if bool((~keep_now & ~visual_now).any()):
            raise ValueError("Only visual tokens may be removed; the keep mask drops a non-visual token.")
        # Back to original positions: a token stays if it stayed before and stays now.
        keep_original = ~step.visual
        rows = torch.arange(previous.index.shape[0], device=hidden.device).unsqueeze(1).expand_as(previous.index)
        kept_now = previous.kept_visual & keep_now
        keep_original[rows[kept_now], previous.index[kept_now]] = True
        selection = TokenSelection.from_keep_mask(keep_original, step.visual)
        # The same kept set as a selection over the previous sequence, to gather the hidden states from it.
        slot_of = self._slots_of_original(previous)
        relative = TokenSelection(
            index=slot_of.gather(1, selection.index).clamp(min=0), valid=selection.valid,
            kept_visual=selection.kept_visual, removed_visual=previous.kept_visual & ~keep_now,
            original_length=previous.compressed_length,
        )
        compressed = self.method.compress(hidden, relative, self.compressor)
        given_mask = step.attention_mask_2d
        mask_2d = given_mask if given_mask is not None else torch.ones_like(step.visual, dtype=torch.long)
        step.selection = selection
        step.compressed_mask_2d = selection.gather(mask_2d, seq_dim=1, fill=0)
        step.stage_masks_2d.append(step.compressed_mask_2d)
        layer_kwargs: dict[str, Any] = {}
        if kwargs.get("position_embeddings") is not None:
            layer_kwargs["position_embeddings"] = self.adapter.gather_position_embeddings(
                kwargs["position_embeddings"], selection.gather
            )
        if kwargs.get("position_ids") is not None:
            layer_kwargs["position_ids"] = self.adapter.gather_position_ids(kwargs["position_ids"], selection.gather)
        step.layer_kwargs = layer_kwargs
        mask_for_layers = None if given_mask is None and bool(selection.valid.all()) else step.compressed_mask_2d
        self._build_masks(step, compressed, mask_for_layers, cache, stage)
        step.stage_reports.append(self._stage_record(stage, selection))
        self._map_stage_query_positions(step, stage + 1)
        # The report: the first boundary's layer and scores, the final kept set; every stage in extra["stages"].
        self._record_report(step.visual, step.first_scores, selection, extra={"stages": list(step.stage_reports)})
        return compressed

    def _selection_inputs(
        self, hidden: torch.Tensor, kwargs: dict[str, Any], mask_2d: torch.Tensor,
        scorer: LastTokenAttentionScorer | None = None, slot_positions: torch.Tensor | None = None,
    ) -> SelectionInputs:
        """Layer K's input (raw and final-normed), layer K-1's post-RoPE keys, mask and scoring positions; at a
        later boundary (``scorer`` = its stage scorer, ``slot_positions`` (B, M)) the same for that stage."""
        scorer = self.scorer if scorer is None else scorer
        assert scorer is not None and self._step is not None
        keys = scorer.rotated_keys(kwargs.get("position_embeddings"))
        batch, length = mask_2d.shape
        positions = scorer.query_positions
        if positions is None:
            positions = torch.full((batch,), length - 1, dtype=torch.long, device=mask_2d.device)
        if slot_positions is None:
            slot_positions = torch.arange(length, device=mask_2d.device).unsqueeze(0).expand(batch, length)
        rows = None
        if self.method.needs_attention_rows:
            rows = scorer.attention_rows_function(kwargs.get("position_embeddings"), mask_2d)
        # Without a selection the final norm's own hook passes this through (at a later boundary the sequence has
        # the current selection's length, which the hook would scatter back).
        selection, self._step.selection = self._step.selection, None
        try:
            normed = self.adapter.final_norm()(hidden)
        finally:
            self._step.selection = selection
        return SelectionInputs(hidden_states=hidden, normed_hidden_states=normed, keys=keys,
                               attention_mask_2d=mask_2d, query_positions=positions,
                               input_embeddings=self._step.input_embeddings, attention_rows=rows,
                               slot_positions=slot_positions)

    def _stage_of(self, layer_idx: int) -> int:
        """Stage of a layer >= K: how many boundaries after the first it has passed (0 for single-stage methods)."""
        return sum(1 for boundary in self.layers[1:] if layer_idx >= boundary)

    def _build_masks(
        self, step: _Step, hidden: torch.Tensor, mask_2d: torch.Tensor | None, cache: Any, stage: int = 0
    ) -> None:
        """One mask per attention type of a stage's layers (all layers >= K for one stage), each sized from the
        first such layer's cache."""
        end = self.layers[stage + 1] if stage + 1 < len(self.layers) else self.adapter.num_layers()
        masks = step.masks if stage == 0 else step.stage_masks.setdefault(stage, {})
        for idx in range(self.layers[stage], end):
            kind = self.adapter.layer_mask_type(idx)
            if kind not in masks:
                masks[kind] = self.adapter.build_mask(kind, hidden, mask_2d, cache, idx)

    def _decode_mask_2d(
        self, state: _DecodeState, mask_2d: torch.Tensor | None, past: int, query_length: int,
        prefill_mask_2d: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, M + new) mask for layers >= K: the prefill's compressed mask (``prefill_mask_2d``, default the first
        stage's) plus every column after the prompt."""
        compressed = state.compressed_mask_2d if prefill_mask_2d is None else prefill_mask_2d
        new_columns = past + query_length - state.prefill_cache_length
        if mask_2d is not None:
            tail = mask_2d[:, mask_2d.shape[1] - new_columns:]
        else:
            tail = torch.ones(compressed.shape[0], new_columns, dtype=compressed.dtype, device=compressed.device)
        return torch.cat([compressed, tail.to(compressed.dtype)], dim=1)

    def _final_norm_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        step = self._step
        if step is None or step.phase != "prefill" or step.selection is None or step.selection.is_identity:
            return None
        if output.shape[1] != step.selection.compressed_length:
            return None
        base = output.new_zeros(output.shape[0], step.selection.original_length, output.shape[2])
        return step.selection.scatter_back(output, base)

    # --- report ----------------------------------------------------------------------------------------------
    def _record_report(
        self,
        visual: torch.Tensor,
        scores: torch.Tensor | None,
        selection: TokenSelection,
        kl: torch.Tensor | None = None,
        extra: dict[str, object] | None = None,
    ) -> None:
        visual_positions = positions_of(visual)
        padded = visual_positions < 0
        if scores is None:
            visual_scores = torch.full(visual_positions.shape, float("nan"), device=visual.device)
        else:
            visual_scores = scores.float().gather(1, visual_positions.clamp(min=0)).masked_fill(padded, float("nan"))
        self.report = CompressionReport(
            method=self.config.method,
            layer=self.layer,
            visual_positions=visual_positions,
            scores=visual_scores.detach(),
            kept_positions=selection.kept_visual_positions(),
            num_visual=visual.sum(dim=1),
            num_kept=selection.kept_visual.sum(dim=1),
            seq_len_before=selection.original_length,
            seq_len_after=selection.compressed_length,
            kl=kl,
            extra=dict(extra or {}),
        )


def _scoring_positions(labels: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """(B,) position of the last prompt token under teacher forcing (the one before the first label), else None.

    At inference the prompt ends at the last position; with ``labels`` the answer follows it, and scoring from the
    end of the answer would let selection see the answer (and differ from inference).
    """
    if labels is None or labels.dim() != 2 or labels.shape[1] != length:
        return None
    supervised = labels != -100
    first = torch.where(supervised.any(dim=1), supervised.float().argmax(dim=1), torch.full_like(labels[:, 0], length))
    return (first - 1).clamp(min=0).long()


def _query_length(args: tuple, kwargs: dict[str, Any]) -> int:
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if input_ids is not None:
        return int(input_ids.shape[1])
    return int(kwargs["inputs_embeds"].shape[1])
