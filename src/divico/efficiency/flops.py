"""Analytic FLOPs of a LLaVA-style model under layer-K visual-token compression.

Conventions (the same as ``torch.utils.flop_counter.FlopCounterMode``, so the two can be compared):

* Only matrix products are counted, one multiply-add = 2 FLOPs: linear layers, the patch-embedding
  convolution, attention scores ``q k^T`` and the weighted sum ``p v``. Bias additions, RMSNorm /
  LayerNorm, RoPE, softmax, activations, pooling and means are elementwise and not counted (together
  well under 1% of a LLaVA-7B prefill).
* Attention ``"causal"`` counts exactly the pairs a causal mask allows: query row ``i`` (0-based) of a
  prefill attends to ``i + 1`` keys, so a layer of ``S`` tokens has ``S (S + 1) / 2`` pairs, each costing
  ``2 * head_dim`` FLOPs for the scores and ``2 * head_dim`` for the weighted sum, per query head. This is
  the useful work. ``"dense"`` counts ``S * S`` pairs: what an SDPA kernel or eager attention actually
  multiplies when it does not skip masked blocks, and what ``FlopCounterMode`` reports.
* GQA: the k and v projections produce ``num_key_value_heads * head_dim`` features; attention FLOPs
  are counted per query head (keys are shared, the products are not).
* The vision tower attends bidirectionally over its patches + CLS (always dense). LLaVA runs every
  vision layer even though it reads layer -2 (measured here with ``FlopCounterMode``).

Everything method-specific comes from the registered method itself (:class:`divico.methods.CompressionMethod`):
the visual tokens it keeps, the tokens each decoder layer processes (layer-level methods: layers ``< K`` see all
``N`` tokens, layers ``>= K`` see ``N - Nv + k``; input-level methods such as DeCo: every layer sees ``N - Nv + k``),
the tokens the projector maps and the FLOPs it adds (scoring, DiViCo's g_theta). ``"none"`` is the uncompressed
model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from divico.config import CompressionConfig, keep_count
from divico.efficiency.presets import PromptShape
from divico.methods.base import CompressionMethod, TextShape
from divico.registry import available_methods, get_method_class

__all__ = [
    "METHODS",
    "FlopsBreakdown",
    "LayerFlops",
    "count_flops",
    "decode_step_flops",
    "paper_eq10_layer",
    "paper_eq11_reduction",
    "resolve_keep_tokens",
]

#: "none" (the uncompressed model) and every method registered when this module was imported; the live list is
#: ``("none", *divico.available_methods())``, which :func:`count_flops` accepts.
METHODS: tuple[str, ...] = ("none", *available_methods())
AttentionConvention = Literal["causal", "dense"]


@dataclass(frozen=True)
class LayerFlops:
    """FLOPs of one LLM decoder layer (summed over the batch).

    Attributes
    ----------
    index : int
        Decoder layer index.
    tokens : int
        Query tokens per sample this layer processes.
    keys : int
        Key/value tokens per sample it attends over (``tokens`` in a prefill).
    projections : int
        q, k, v and o projections (GQA-aware).
    attention : int
        Scores ``q k^T`` plus weighted sum ``p v`` under the breakdown's attention convention.
    mlp : int
        The gated MLP's gate, up and down matrices.
    """

    index: int
    tokens: int
    keys: int
    projections: int
    attention: int
    mlp: int

    @property
    def total(self) -> int:
        """All FLOPs of the layer."""
        return self.projections + self.attention + self.mlp


@dataclass
class FlopsBreakdown:
    """Analytic FLOPs of one forward pass, by component.

    Attributes
    ----------
    method : str
    keep_tokens : int
        Visual tokens kept per sample (``Nv`` for ``none``), as the method keeps them: for ``deco`` the size of the
        near-square pooled grid, which can differ from the requested count (``divico.methods.deco.pooled_grid``).
    layer : int
        Compression layer K (0 for ``deco``/``none``: every layer sees the same length).
    attention_convention : str
        ``"causal"`` or ``"dense"`` (see the module docstring).
    prompt : PromptShape
    vision_tower : int
        Patch embedding and encoder layers of the vision tower.
    projector : int
        The multimodal projector.
    llm_layers : list of LayerFlops
    scoring : int
        Compressor overhead of ranking visual tokens at layer K-1: the last prompt token's
        (B, H, 1, N) logits (``sdpa`` scoring) or the full (B, H, N, N) logits of the FastV-style
        reference (``full_attention``), each computed beside the layer's own attention.
    compressor : int
        DiViCo's g_theta on the kept tokens and the mean of the removed ones (0 for other methods).
    lm_head : int
        Logits for the last position (``lm_head="last"``) or for every position (``"all"``).
    paper_eq10 : int
        The paper's simplified figure: sum over LLM layers of Eq. 10, ``4 N d^2 + 2 N^2 d + 2 N d m`` at
        each layer's own token count, times the batch. It counts multiply-adds as one operation and
        the FFN as two matrices; compare ratios, not absolute values.
    """

    method: str
    keep_tokens: int
    layer: int
    attention_convention: str
    prompt: PromptShape
    vision_tower: int
    projector: int
    llm_layers: list[LayerFlops] = field(default_factory=list)
    scoring: int = 0
    compressor: int = 0
    lm_head: int = 0
    paper_eq10: int = 0

    @property
    def per_layer(self) -> list[int]:
        """Tokens per sample each LLM layer processes, in layer order."""
        return [layer.tokens for layer in self.llm_layers]

    @property
    def llm(self) -> int:
        """Sum over the LLM decoder layers."""
        return sum(layer.total for layer in self.llm_layers)

    @property
    def overhead(self) -> int:
        """Compressor overhead: scoring + g_theta."""
        return self.scoring + self.compressor

    @property
    def llm_prefill(self) -> int:
        """Everything after the projector: decoder layers, overhead and LM head."""
        return self.llm + self.overhead + self.lm_head

    @property
    def total(self) -> int:
        """The whole forward pass."""
        return self.vision_tower + self.projector + self.llm_prefill

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary, with the derived totals."""
        return {
            "method": self.method,
            "keep_tokens": self.keep_tokens,
            "layer": self.layer,
            "attention_convention": self.attention_convention,
            "prompt": asdict(self.prompt),
            "vision_tower": self.vision_tower,
            "projector": self.projector,
            "llm": self.llm,
            "scoring": self.scoring,
            "compressor": self.compressor,
            "lm_head": self.lm_head,
            "llm_prefill": self.llm_prefill,
            "total": self.total,
            "paper_eq10": self.paper_eq10,
            "per_layer_tokens": self.per_layer,
            "per_layer_flops": [layer.total for layer in self.llm_layers],
        }


def _check_count(name: str, value: Any, minimum: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def resolve_keep_tokens(visual_tokens: int, keep_tokens: int | None = None, keep_ratio: float | None = None) -> int:
    """Visual tokens kept per sample from a count or a ratio (the engine's rule, :func:`divico.config.keep_count`).

    Parameters
    ----------
    visual_tokens : int
        ``Nv``, at least 1.
    keep_tokens : int, optional
        Kept count, ``1 <= keep_tokens <= Nv``.
    keep_ratio : float, optional
        Kept share in ``(0, 1]``; rounded to the nearest integer, at least 1.

    Returns
    -------
    int
    """
    _check_count("visual_tokens", visual_tokens, 1)
    if (keep_tokens is None) == (keep_ratio is None):
        raise ValueError("give exactly one of keep_tokens and keep_ratio")
    return keep_count(visual_tokens, keep_tokens=keep_tokens, keep_ratio=keep_ratio)


def _text_shapes(text_config: Any) -> dict[str, int]:
    hidden = int(text_config.hidden_size)
    heads = int(text_config.num_attention_heads)
    head_dim = getattr(text_config, "head_dim", None) or hidden // heads
    return {
        "hidden": hidden,
        "heads": heads,
        "kv_heads": int(getattr(text_config, "num_key_value_heads", None) or heads),
        "head_dim": int(head_dim),
        "mlp": int(text_config.intermediate_size),
        "layers": int(text_config.num_hidden_layers),
        "vocab": int(text_config.vocab_size),
    }


def _attention_pairs(tokens: int, keys: int, convention: str) -> int:
    """Query-key pairs of one head: causal queries are the last ``tokens`` of ``keys`` positions."""
    if convention == "dense":
        return tokens * keys
    past = keys - tokens
    return tokens * past + tokens * (tokens + 1) // 2


def _decoder_layer(index: int, tokens: int, keys: int, shapes: dict[str, int], convention: str,
                   batch: int) -> LayerFlops:
    d, hd = shapes["hidden"], shapes["head_dim"]
    q_features = shapes["heads"] * hd
    kv_features = shapes["kv_heads"] * hd
    projections = 2 * tokens * d * (2 * q_features + 2 * kv_features)
    attention = 4 * shapes["heads"] * hd * _attention_pairs(tokens, keys, convention)
    mlp = 3 * 2 * tokens * d * shapes["mlp"]
    return LayerFlops(index, tokens, keys, batch * projections, batch * attention, batch * mlp)


def _vision_flops(vision_config: Any, patches_per_image: int, images: int, layers_run: int | None = None) -> int:
    """Vision tower FLOPs for ``images`` images of ``patches_per_image`` patches each."""
    model_type = getattr(vision_config, "model_type", "")
    hidden = int(vision_config.hidden_size)
    if model_type in ("clip_vision_model", "clip"):
        tokens = patches_per_image + 1
        mlp = int(vision_config.intermediate_size)
    elif model_type == "dinov2":
        if getattr(vision_config, "use_swiglu_ffn", False):
            raise ValueError("Dinov2 with a SwiGLU FFN (use_swiglu_ffn=True) is not counted; supported: CLIP, Dinov2 with an MLP FFN")
        tokens = patches_per_image + 1
        mlp = int(hidden * vision_config.mlp_ratio)
    else:
        raise ValueError(f"vision tower {model_type!r} is not counted; supported: CLIP, Dinov2")
    patch = int(vision_config.patch_size)
    channels = int(getattr(vision_config, "num_channels", 3))
    embedding = 2 * patches_per_image * hidden * channels * patch * patch
    per_layer = 2 * tokens * hidden * hidden * 4 + 4 * tokens * tokens * hidden + 2 * 2 * tokens * hidden * mlp
    depth = int(vision_config.num_hidden_layers) if layers_run is None else layers_run
    return images * (embedding + depth * per_layer)


def paper_eq10_layer(tokens: int, hidden: int, mlp: int) -> int:
    """The paper's Eq. 10 for one layer: ``4 N d^2 + 2 N^2 d + 2 N d m``."""
    return 4 * tokens * hidden**2 + 2 * tokens**2 * hidden + 2 * tokens * hidden * mlp


def paper_eq11_reduction(num_layers: int, layer: int, visual_tokens: int, keep_tokens: int, hidden: int,
                         mlp: int) -> float:
    """The paper's Eq. 11: FLOPs removed by compressing ``Nv`` visual tokens to ``N'`` at layer K.

    ``(L - K)(4 Nb d^2 + (1 + t)/(1 - t) 2 Nb^2 d + 2 Nb d m) - 4 N' d^2`` with ``t = N'/Nv`` and
    ``Nb = Nv - N'``; the last term is the paper's estimate of DiViCo's own cost.
    """
    removed = visual_tokens - keep_tokens
    if removed == 0:
        return -4.0 * keep_tokens * hidden**2
    tau = keep_tokens / visual_tokens
    per_layer = 4 * removed * hidden**2 + (1 + tau) / (1 - tau) * 2 * removed**2 * hidden + 2 * removed * hidden * mlp
    return (num_layers - layer) * per_layer - 4 * keep_tokens * hidden**2


def count_flops(
    config: Any,
    prompt: PromptShape,
    method: str = "none",
    keep_tokens: int | None = None,
    keep_ratio: float | None = None,
    layer: int = 2,
    scoring: str = "sdpa",
    attention: AttentionConvention = "causal",
    lm_head: Literal["last", "all"] = "last",
    compressor_hidden: int | None = None,
    deterministic: bool = False,
    num_layers: int | None = None,
    deco_pool_before_projector: bool = True,
    vision_layers_run: int | None = None,
    compression: CompressionConfig | None = None,
) -> FlopsBreakdown:
    """Analytic FLOPs of one prefill forward pass of a LLaVA-style model.

    Parameters
    ----------
    config : transformers.LlavaConfig
        Needs ``vision_config``, ``text_config`` and ``vision_feature_layer``.
    prompt : PromptShape
        Token counts; ``prompt.visual_tokens_per_image`` sets the vision tower's patch count.
    method : str
        ``"none"`` (uncompressed) or a registered method name (``divico.available_methods()``).
    keep_tokens, keep_ratio
        Visual tokens kept per sample (exactly one, except for ``none``), as in ``divico.CompressionConfig``
        (for input-level methods such as ``deco``: per image).
    layer : int
        Compression layer K, ``1 <= K < num_layers`` (layer-level methods).
    scoring : {"sdpa", "full_attention"}
        How score-based methods rank tokens (see :class:`FlopsBreakdown.scoring`).
    attention : {"causal", "dense"}
        Attention-FLOPs convention (see the module docstring); ``"dense"`` matches FlopCounterMode.
    lm_head : {"last", "all"}
        Logits for the last position only (generation) or for all positions (``logits_to_keep=0``).
    compressor_hidden : int, optional
        DiViCo's g_theta hidden width (``CompressionConfig.encoder_hidden_size``; default: its own default).
    deterministic : bool
        DiViCo's deterministic variant (g_theta's last layer outputs ``d``, not ``2d``).
    num_layers : int, optional
        Count this many decoder layers instead of the config's (full-depth extrapolation).
    deco_pool_before_projector : bool
        Whether an input-level method pools before the projector (projector on ``k`` tokens) or after (on ``Nv``).
    vision_layers_run : int, optional
        Vision encoder layers that run (default: all).
    compression : CompressionConfig, optional
        The full compression config; when given, ``method``, ``keep_*``, ``layer``, ``scoring``,
        ``compressor_hidden`` and ``deterministic`` are taken from it instead.

    Returns
    -------
    FlopsBreakdown
    """
    if attention not in ("causal", "dense"):
        raise ValueError(f"attention must be 'causal' or 'dense', got {attention!r}")
    if lm_head not in ("last", "all"):
        raise ValueError(f"lm_head must be 'last' or 'all', got {lm_head!r}")
    if not isinstance(prompt, PromptShape):
        raise TypeError(f"prompt must be a PromptShape, got {type(prompt).__name__}")
    compressor = _method_for(compression, method, keep_tokens, keep_ratio, layer, scoring, compressor_hidden,
                             deterministic)
    shapes = _text_shapes(config.text_config)
    depth = shapes["layers"] if num_layers is None else _check_count("num_layers", num_layers, 1)
    visual = prompt.visual_tokens
    batch = prompt.batch_size
    full_len = prompt.seq_len
    if compressor is None:
        kept, compress_at, name = visual, 0, "none"
        tokens_per_layer = [full_len] * depth
        overhead: dict[str, int] = {}
        projected_tokens = visual
    else:
        name = compressor.name
        # A layer schedule (PyramidDrop) is scaled to the depth: its first boundary is where compression starts.
        compress_at = compressor.compression_layers(depth)[0]
        if compressor.level == "layer" and compress_at >= depth:
            raise ValueError(f"layer must be in [1, {depth - 1}] for a {depth}-layer LLM, got {compress_at!r}")
        kept = compressor.kept_visual_tokens(prompt.images, prompt.visual_tokens_per_image)
        tokens_per_layer = compressor.tokens_per_layer(depth, full_len, visual, kept)
        text_shape = TextShape(shapes["hidden"], shapes["heads"], shapes["head_dim"])
        overhead = compressor.overhead_flops(text_shape, full_len, kept)
        projected_tokens = compressor.projector_tokens(visual, kept) if deco_pool_before_projector else visual
    llm_layers = [_decoder_layer(index, tokens, tokens, shapes, attention, batch)
                  for index, tokens in enumerate(tokens_per_layer)]

    d = shapes["hidden"]
    vision = config.vision_config
    feature_layer = getattr(config, "vision_feature_layer", -1)
    feature_layers = 1 if isinstance(feature_layer, int) else len(feature_layer)
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    patches = prompt.visual_tokens_per_image - (1 if strategy == "full" else 0)
    vision_flops = batch * _vision_flops(vision, patches, prompt.images, vision_layers_run)
    vision_out = int(vision.hidden_size) * feature_layers
    projector = batch * projected_tokens * 2 * (vision_out * d + d * d)

    last_tokens = llm_layers[-1].tokens
    head_positions = 1 if lm_head == "last" else last_tokens
    lm_head_flops = batch * head_positions * 2 * d * shapes["vocab"]
    paper = batch * sum(paper_eq10_layer(layer_.tokens, d, shapes["mlp"]) for layer_ in llm_layers)
    return FlopsBreakdown(
        method=name,
        keep_tokens=kept,
        layer=compress_at,
        attention_convention=attention,
        prompt=prompt,
        vision_tower=vision_flops,
        projector=projector,
        llm_layers=llm_layers,
        scoring=batch * overhead.get("scoring", 0),
        compressor=batch * sum(value for key, value in overhead.items() if key != "scoring"),
        lm_head=lm_head_flops,
        paper_eq10=paper,
    )


def _method_for(
    compression: CompressionConfig | None,
    method: str,
    keep_tokens: int | None,
    keep_ratio: float | None,
    layer: int,
    scoring: str,
    compressor_hidden: int | None,
    deterministic: bool,
) -> CompressionMethod | None:
    """The registered method instance to account for (None: the uncompressed model)."""
    if compression is None:
        if method == "none":
            return None
        if method not in available_methods():
            raise ValueError(f"unknown method {method!r}; valid methods: none, {', '.join(available_methods())}")
        if compressor_hidden is not None:
            _check_count("compressor_hidden", compressor_hidden, 1)
        compression = CompressionConfig(
            method=method, keep_tokens=keep_tokens, keep_ratio=keep_ratio, layer=layer, scoring=scoring,
            encoder="deterministic" if deterministic else "variational", encoder_hidden_size=compressor_hidden,
        )
    elif not isinstance(compression, CompressionConfig):
        raise TypeError(f"compression must be a divico.CompressionConfig, got {type(compression).__name__}")
    return get_method_class(compression.method)(compression)


def decode_step_flops(config: Any, cache_tokens: list[int], batch_size: int = 1,
                      attention: AttentionConvention = "causal") -> int:
    """FLOPs of generating one token with a KV cache.

    Parameters
    ----------
    config : transformers.LlavaConfig or text config
    cache_tokens : list of int
        Cached tokens per sample in each decoder layer before the step (layers >= K hold fewer).
    batch_size : int
    attention : {"causal", "dense"}
        Identical for one query row; kept for symmetry.

    Returns
    -------
    int
        Decoder layers plus the LM head for one position.
    """
    text_config = getattr(config, "text_config", config)
    shapes = _text_shapes(text_config)
    _check_count("batch_size", batch_size, 1)
    if len(cache_tokens) != shapes["layers"]:
        raise ValueError(f"cache_tokens has {len(cache_tokens)} entries for {shapes['layers']} layers")
    total = 0
    for index, cached in enumerate(cache_tokens):
        _check_count(f"cache_tokens[{index}]", cached, 0)
        total += _decoder_layer(index, 1, cached + 1, shapes, attention, batch_size).total
    return total + batch_size * 2 * shapes["hidden"] * shapes["vocab"]
